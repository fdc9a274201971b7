//! TEMPORARY naive stand-ins with the final kernel API (replaced by the real kernels).
#![allow(clippy::too_many_arguments)]

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Identity,
    Relu,
    Swish,
    Sigmoid,
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl Activation {
    fn apply(self, x: f32) -> f32 {
        match self {
            Activation::Identity => x,
            Activation::Relu => x.max(0.0),
            Activation::Swish => x * sigmoid(x),
            Activation::Sigmoid => sigmoid(x),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    pub in_h: usize,
    pub in_w: usize,
    pub cin: usize,
    pub cout: usize,
    pub kernel: usize,
    pub stride: usize,
    pub pad_top: usize,
    pub pad_left: usize,
    pub out_h: usize,
    pub out_w: usize,
}

pub struct PackedConv {
    w: Vec<f32>,
}
impl PackedConv {
    pub fn pack(w_oihw: &[f32], _cout: usize, _cin: usize, _kernel: usize) -> Self {
        PackedConv { w: w_oihw.to_vec() }
    }
}
pub struct PackedDepthwise {
    w: Vec<f32>,
}
impl PackedDepthwise {
    pub fn pack(w: &[f32], _channels: usize, _kernel: usize) -> Self {
        PackedDepthwise { w: w.to_vec() }
    }
}

pub fn conv2d_nhwc(
    x: &[f32],
    g: &ConvGeometry,
    w: &PackedConv,
    bias: &[f32],
    act: Activation,
    residual: Option<&[f32]>,
    y: &mut [f32],
) {
    let k = g.kernel;
    for oy in 0..g.out_h {
        for ox in 0..g.out_w {
            for o in 0..g.cout {
                let mut acc = bias[o];
                for ky in 0..k {
                    let iy = (oy * g.stride + ky) as isize - g.pad_top as isize;
                    if iy < 0 || iy >= g.in_h as isize {
                        continue;
                    }
                    for kx in 0..k {
                        let ix = (ox * g.stride + kx) as isize - g.pad_left as isize;
                        if ix < 0 || ix >= g.in_w as isize {
                            continue;
                        }
                        let xb = (iy as usize * g.in_w + ix as usize) * g.cin;
                        for i in 0..g.cin {
                            acc += x[xb + i] * w.w[((o * g.cin + i) * k + ky) * k + kx];
                        }
                    }
                }
                let idx = (oy * g.out_w + ox) * g.cout + o;
                y[idx] = act.apply(acc) + residual.map_or(0.0, |r| r[idx]);
            }
        }
    }
}

pub fn depthwise_conv2d_nhwc(
    x: &[f32],
    g: &ConvGeometry,
    w: &PackedDepthwise,
    bias: &[f32],
    act: Activation,
    y: &mut [f32],
) {
    let k = g.kernel;
    for oy in 0..g.out_h {
        for ox in 0..g.out_w {
            for c in 0..g.cout {
                let mut acc = bias[c];
                for ky in 0..k {
                    let iy = (oy * g.stride + ky) as isize - g.pad_top as isize;
                    if iy < 0 || iy >= g.in_h as isize {
                        continue;
                    }
                    for kx in 0..k {
                        let ix = (ox * g.stride + kx) as isize - g.pad_left as isize;
                        if ix < 0 || ix >= g.in_w as isize {
                            continue;
                        }
                        acc += x[(iy as usize * g.in_w + ix as usize) * g.cin + c]
                            * w.w[(c * k + ky) * k + kx];
                    }
                }
                y[(oy * g.out_w + ox) * g.cout + c] = act.apply(acc);
            }
        }
    }
}

pub struct SqueezeExcite {
    pub channels: usize,
    pub squeeze: usize,
    pub reduce_w: Vec<f32>,
    pub reduce_b: Vec<f32>,
    pub expand_w: Vec<f32>,
    pub expand_b: Vec<f32>,
}

fn mean(x: &[f32], pixels: usize, c: usize) -> Vec<f32> {
    let mut m = vec![0f32; c];
    for p in 0..pixels {
        for i in 0..c {
            m[i] += x[p * c + i];
        }
    }
    m.iter_mut().for_each(|v| *v /= pixels as f32);
    m
}

fn fc(w: &[f32], b: &[f32], x: &[f32], act: Activation) -> Vec<f32> {
    let n = x.len();
    b.iter()
        .enumerate()
        .map(|(o, bo)| act.apply(bo + (0..n).map(|i| w[o * n + i] * x[i]).sum::<f32>()))
        .collect()
}

pub fn squeeze_excite_nhwc(x: &[f32], pixels: usize, se: &SqueezeExcite, y: &mut [f32]) {
    let c = se.channels;
    let m = mean(x, pixels, c);
    let h = fc(&se.reduce_w, &se.reduce_b, &m, Activation::Swish);
    let gate = fc(&se.expand_w, &se.expand_b, &h, Activation::Sigmoid);
    for p in 0..pixels {
        for i in 0..c {
            y[p * c + i] = x[p * c + i] * gate[i];
        }
    }
}

pub struct Scse {
    pub channels: usize,
    pub hidden: usize,
    pub cse1_w: Vec<f32>,
    pub cse1_b: Vec<f32>,
    pub cse3_w: Vec<f32>,
    pub cse3_b: Vec<f32>,
    pub sse_w: Vec<f32>,
    pub sse_b: f32,
}

pub fn scse_nhwc(x: &[f32], pixels: usize, w: &Scse, y: &mut [f32]) {
    let c = w.channels;
    let m = mean(x, pixels, c);
    let h = fc(&w.cse1_w, &w.cse1_b, &m, Activation::Relu);
    let gate = fc(&w.cse3_w, &w.cse3_b, &h, Activation::Sigmoid);
    for p in 0..pixels {
        let xs = &x[p * c..(p + 1) * c];
        let s = sigmoid(w.sse_b + xs.iter().zip(&w.sse_w).map(|(a, b)| a * b).sum::<f32>());
        for i in 0..c {
            y[p * c + i] = xs[i] * gate[i] + xs[i] * s;
        }
    }
}

pub fn soft_align_nhwc(
    fq: &[f32],
    q: &[f32],
    k: &[f32],
    fp: &[f32],
    n: usize,
    cin: usize,
    hidden: usize,
    y: &mut [f32],
) {
    for i in 0..n {
        let logits: Vec<f32> = (0..n)
            .map(|j| {
                (0..hidden)
                    .map(|c| q[i * hidden + c] * k[j * hidden + c])
                    .sum()
            })
            .collect();
        let mx = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = logits.iter().map(|l| (l - mx).exp()).collect();
        let s: f32 = e.iter().sum();
        let out = &mut y[i * 2 * cin..(i + 1) * 2 * cin];
        out[..cin].copy_from_slice(&fq[i * cin..(i + 1) * cin]);
        for c in 0..cin {
            out[cin + c] = (0..n).map(|j| e[j] * fp[j * cin + c]).sum::<f32>() / s;
        }
    }
}

pub fn upsample2x_concat_nhwc(
    x: &[f32],
    h: usize,
    w: usize,
    cx: usize,
    skip: Option<&[f32]>,
    cs: usize,
    y: &mut [f32],
) {
    let ct = cx + cs;
    for oy in 0..2 * h {
        for ox in 0..2 * w {
            let o = (oy * 2 * w + ox) * ct;
            let i = ((oy / 2) * w + ox / 2) * cx;
            y[o..o + cx].copy_from_slice(&x[i..i + cx]);
            if let Some(s) = skip {
                let si = (oy * 2 * w + ox) * cs;
                y[o + cx..o + ct].copy_from_slice(&s[si..si + cs]);
            }
        }
    }
}
