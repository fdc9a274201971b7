// Dense convolution as an implicit GEMM over NHWC:
//   y[p, co] = act(sum_k in[p, k] * w[k, co] + bias[co]) (+ residual[p, co])
// where k runs over (ky, kx, ci). A 1x1 conv (KSIZE = 1, STRIDE = 1) is the plain tiled
// GEMM: the compiler folds the tap arithmetic away.
//
// Tiling: a workgroup of 16 x 16 invocations computes 64 pixels x 64 output channels; each
// invocation keeps 4 pixels x 4 channels (four vec4 accumulators) in registers. The reduction
// advances 16 at a time through workgroup memory; weights are read as vec4 (rows padded to
// a multiple of 4 output channels). Partial sums are added to the total every 256 steps
// of k, which keeps long reductions (up to 11k terms) as accurate as a blocked CPU GEMM.
//
// Split-K (SPLIT_K): a map too small to fill the GPU (dec0.conv1 at 256: 16 tiles of 64 x 64
// over a 10k-term reduction) is cut along k as well. Workgroup z = split * cout_tiles + tile;
// each split sums its k_chunk terms into `partial[split]` (f32, no bias), and
// `split_k_reduce` adds the splits in order, then bias, activation and residual.
//
// Batch: the images of a batch lie one after another in every buffer (the gates too);
// workgroup z = image * z_per_image + (split * cout_tiles + tile).

override KSIZE: u32 = 1u;
override STRIDE: u32 = 1u;
override ACT: u32 = ACT_IDENTITY;
override RESIDUAL: bool = false;
// INPUT_PLAIN. INPUT_CHANNEL_SCALED: scaled per channel by `cgate` (squeeze-excite folded in).
// INPUT_UP_CONCAT: nearest-x2 upsample of `x` (ca channels) concatenated with `skip`
//    (cin - ca channels), never written out. INPUT_UP_CONCAT_GATED: as INPUT_UP_CONCAT, then
//    scaled by the scSE gates: v * cgate[c] + v * sgate[p].
override INPUT_MODE: u32 = INPUT_PLAIN;
override SPLIT_K: bool = false;

struct Params {
    in_h: u32,
    in_w: u32,
    cin: u32,
    cout: u32,
    out_h: u32,
    out_w: u32,
    pad_top: u32,
    pad_left: u32,
    ca: u32,
    pixel_tiles: u32,
    cout_vec4: u32,
    k_chunk: u32,
    cout_tiles: u32,
    z_per_image: u32,
    // Weights per image: image i reads block (i % w_images), w_image_stride vec4s each (the
    // Winograd GEMM's 36 transformed kernels; 1 and 0 for a plain conv).
    w_images: u32,
    w_image_stride: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<store>;
@group(0) @binding(2) var<storage, read> w: array<vec4<store>>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<store>;
@group(0) @binding(5) var<storage, read> skip: array<store>;
@group(0) @binding(6) var<storage, read> cgate: array<f32>;
@group(0) @binding(7) var<storage, read> sgate: array<f32>;
@group(0) @binding(8) var<storage, read> residual: array<store>;
@group(0) @binding(9) var<storage, read_write> partial: array<f32>;

struct ReduceParams {
    elems: u32,
    cout: u32,
    splits: u32,
    _pad0: u32,
}

@group(0) @binding(10) var<uniform> reduce_params: ReduceParams;

const TILE: u32 = 64u;
const KT: u32 = 16u;
const FLUSH_STEPS: u32 = 16u;

var<workgroup> xs: array<vec4<f32>, 256>;
var<workgroup> ws: array<vec4<f32>, 256>;

@compute @workgroup_size(16, 16, 1)
fn conv2d_nhwc(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let tile = folded_index(wid, groups);
    if tile >= params.pixel_tiles {
        return;
    }
    let p0 = tile * TILE;
    let image = wid.z / params.z_per_image;
    let z = wid.z % params.z_per_image;
    set_image(image);
    let w_base = (image % params.w_images) * params.w_image_stride;
    var co_tile = z;
    var k_begin = 0u;
    var kk = KSIZE * KSIZE * params.cin;
    if SPLIT_K {
        co_tile = z % params.cout_tiles;
        k_begin = (z / params.cout_tiles) * params.k_chunk;
        kk = min(kk, k_begin + params.k_chunk);
    }
    let co0 = co_tile * TILE;
    // This invocation's share of the tile loads.
    let a_k = li % KT;
    let a_px = (li / KT) * 4u;
    let b_k = li / 16u;
    let b_co4 = co0 / 4u + li % 16u;

    // The im2col addressing is incremental: this invocation's 4 pixels are fixed, and its
    // reduction index advances by KT per step, so no division runs inside the loop.
    let pixels = params.out_h * params.out_w;
    var row: array<i32, 4>;
    var col: array<i32, 4>;
    for (var i = 0u; i < 4u; i++) {
        let p = min(p0 + a_px + i, pixels - 1u);
        row[i] = i32((p / params.out_w) * STRIDE) - i32(params.pad_top);
        col[i] = i32((p % params.out_w) * STRIDE) - i32(params.pad_left);
    }
    var tap = (k_begin + a_k) / params.cin;
    var ci = (k_begin + a_k) % params.cin;

    var total: array<vec4<f32>, 4>;
    var part: array<vec4<f32>, 4>;
    var steps = 0u;
    for (var k0 = k_begin; k0 < kk; k0 += KT) {
        var av = vec4<f32>(0.0);
        if k0 + a_k < kk {
            let ky = i32(tap / KSIZE);
            let kx = i32(tap % KSIZE);
            for (var i = 0u; i < 4u; i++) {
                if p0 + a_px + i < pixels {
                    av[i] = load_input(row[i] + ky, col[i] + kx, ci);
                }
            }
        }
        xs[a_k * 16u + a_px / 4u] = av;
        ci += KT;
        while ci >= params.cin {
            ci -= params.cin;
            tap += 1u;
        }
        var wv = vec4<f32>(0.0);
        if k0 + b_k < kk && b_co4 < params.cout_vec4 {
            wv = vec4<f32>(w[w_base + (k0 + b_k) * params.cout_vec4 + b_co4]);
        }
        ws[b_k * 16u + li % 16u] = wv;
        workgroupBarrier();
        for (var k = 0u; k < KT; k++) {
            let a = xs[k * 16u + lid.y];
            let b = ws[k * 16u + lid.x];
            part[0] = fma(vec4<f32>(a.x), b, part[0]);
            part[1] = fma(vec4<f32>(a.y), b, part[1]);
            part[2] = fma(vec4<f32>(a.z), b, part[2]);
            part[3] = fma(vec4<f32>(a.w), b, part[3]);
        }
        workgroupBarrier();
        steps += 1u;
        if steps == FLUSH_STEPS {
            for (var i = 0u; i < 4u; i++) {
                total[i] += part[i];
                part[i] = vec4<f32>(0.0);
            }
            steps = 0u;
        }
    }
    let y_base = image * pixels * params.cout;
    for (var i = 0u; i < 4u; i++) {
        let p = p0 + lid.y * 4u + i;
        let sum = total[i] + part[i];
        for (var j = 0u; j < 4u; j++) {
            let co = co0 + lid.x * 4u + j;
            if SPLIT_K {
                if p < pixels && co < params.cout {
                    // [image][split][pixel][channel]: splits = z_per_image / cout_tiles.
                    let split = image * (params.z_per_image / params.cout_tiles) + z / params.cout_tiles;
                    partial[(split * pixels + p) * params.cout + co] = sum[j];
                }
                continue;
            }
            if p < pixels && co < params.cout {
                var v = activate(sum[j] + bias[co], ACT);
                if RESIDUAL {
                    v += f32(residual[y_base + p * params.cout + co]);
                }
                y[y_base + p * params.cout + co] = store(v);
            }
        }
    }
}

// The splits of a split-K conv summed in split order (deterministic), then its epilogue.
// Workgroup z: the image.
@compute @workgroup_size(64, 1, 1)
fn split_k_reduce(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let i = folded_index(wid, groups) * 64u + li;
    if i >= reduce_params.elems {
        return;
    }
    let image = wid.z;
    var sum = 0.0;
    for (var s = 0u; s < reduce_params.splits; s++) {
        sum += partial[(image * reduce_params.splits + s) * reduce_params.elems + i];
    }
    let at = image * reduce_params.elems + i;
    var v = activate(sum + bias[i % reduce_params.cout], ACT);
    if RESIDUAL {
        v += f32(residual[at]);
    }
    y[at] = store(v);
}
