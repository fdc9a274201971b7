// Depthwise KSIZE x KSIZE convolution over NHWC with bias and activation fused:
//   y[p, c] = act(sum_taps x[tap(p), c] * w[tap, c] + bias[c])
// Each invocation computes 4 adjacent channels of one output pixel (several outputs per
// invocation, the weights of those channels read once per tap). Padding is asymmetric:
// top/left come from the params, bottom/right are implied by out_h/out_w (the model's
// stride-2 convs pad 0/1 for k = 3 and 1/2 for k = 5); taps outside the map read zero.

override KSIZE: u32 = 3u;
override STRIDE: u32 = 1u;
override ACT: u32 = ACT_SWISH;

struct Params {
    in_h: u32,
    in_w: u32,
    channels: u32,
    out_h: u32,
    out_w: u32,
    pad_top: u32,
    pad_left: u32,
    channel_quads: u32,
    total: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
    _pad3: u32,
    _pad4: u32,
    _pad5: u32,
    _pad6: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<store>;
// [ky][kx][c]
@group(0) @binding(2) var<storage, read> w: array<store>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<store>;

@compute @workgroup_size(64, 1, 1)
fn depthwise_nhwc(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let index = folded_index(wid, groups) * 64u + li;
    if index >= params.total {
        return;
    }
    let c = params.channels;
    // Workgroup z: the image of the batch (images one after another).
    let x_base = wid.z * params.in_h * params.in_w * c;
    let y_base = wid.z * params.out_h * params.out_w * c;
    let p = index / params.channel_quads;
    let c0 = (index % params.channel_quads) * 4u;
    let lanes = min(4u, c - c0);
    let oy = p / params.out_w;
    let ox = p % params.out_w;
    var acc = vec4<f32>(0.0);
    for (var ky = 0u; ky < KSIZE; ky++) {
        let iy = i32(oy * STRIDE + ky) - i32(params.pad_top);
        if iy < 0 || u32(iy) >= params.in_h {
            continue;
        }
        for (var kx = 0u; kx < KSIZE; kx++) {
            let ix = i32(ox * STRIDE + kx) - i32(params.pad_left);
            if ix < 0 || u32(ix) >= params.in_w {
                continue;
            }
            let src = x_base + (u32(iy) * params.in_w + u32(ix)) * c + c0;
            let tap = (ky * KSIZE + kx) * c + c0;
            for (var j = 0u; j < lanes; j++) {
                acc[j] = fma(f32(x[src + j]), f32(w[tap + j]), acc[j]);
            }
        }
    }
    for (var j = 0u; j < lanes; j++) {
        y[y_base + p * c + c0 + j] = store(activate(acc[j] + bias[c0 + j], ACT));
    }
}
