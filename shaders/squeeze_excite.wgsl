// Squeeze-excite gates, shared by EfficientNet's SE (middle activation swish) and the
// decoder scSE's channel branch (middle activation relu):
//   gate[c] = sigmoid(w2[c, :] . act(w1 . mean_hw(x) + b1) + b2[c])
// Only the gate is written: the scaling itself is folded into the next conv's input.
//
// `channel_sums` reduces a chunk of pixels per workgroup row (adjacent invocations read
// adjacent channels), writing sum * inv_count into partial[chunk][c_off + c]; a concatenated
// input is pooled part by part (the upsampled part pools over its low-resolution source:
// nearest upsampling repeats every pixel exactly four times). Then the two small FCs, each
// spread over the GPU with coalesced weight reads: `excite_hidden` is one workgroup per
// hidden unit (adjacent invocations read adjacent channels of its w1 row, adding the chunks
// on the way: a second summation level, then a tree over the workgroup); `excite_gate` is one
// invocation per channel over w2 transposed at upload (hidden-major), so adjacent
// invocations read adjacent weights.

override MID_ACT: u32 = ACT_SWISH;

struct SumParams {
    pixels: u32,
    channels: u32,
    c_off: u32,
    c_total: u32,
    chunk: u32,
    inv_count: f32,
    _pad0: u32,
    _pad1: u32,
}

struct ExciteParams {
    channels: u32,
    hidden: u32,
    chunks: u32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> sum_params: SumParams;
@group(0) @binding(1) var<storage, read> x: array<store>;
@group(0) @binding(2) var<storage, read_write> partial_out: array<f32>;

@group(0) @binding(3) var<uniform> ex: ExciteParams;
@group(0) @binding(4) var<storage, read> partial_in: array<f32>;
@group(0) @binding(5) var<storage, read> w1: array<f32>;
@group(0) @binding(6) var<storage, read> b1: array<f32>;
@group(0) @binding(7) var<storage, read> w2t: array<f32>;
@group(0) @binding(8) var<storage, read> b2: array<f32>;
@group(0) @binding(9) var<storage, read_write> gate: array<f32>;
@group(0) @binding(10) var<storage, read_write> hidden_out: array<f32>;
@group(0) @binding(11) var<storage, read> hidden_in: array<f32>;

var<workgroup> tree: array<f32, 64>;

@compute @workgroup_size(64, 1, 1)
fn channel_sums(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let c = wid.x * 64u + li;
    if c >= sum_params.channels {
        return;
    }
    // Workgroup y: the chunk; z: the image ([image][chunk][channel] partials).
    let x_base = wid.z * sum_params.pixels * sum_params.channels;
    let start = wid.y * sum_params.chunk;
    let end = min(start + sum_params.chunk, sum_params.pixels);
    var s = 0.0;
    for (var p = start; p < end; p++) {
        s += f32(x[x_base + p * sum_params.channels + c]);
    }
    let row = wid.z * groups.y + wid.y;
    partial_out[row * sum_params.c_total + sum_params.c_off + c] = s * sum_params.inv_count;
}

@compute @workgroup_size(64, 1, 1)
fn excite_hidden(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let h = wid.x;
    let image = wid.z;
    let c_total = ex.channels;
    var s = 0.0;
    for (var c = li; c < c_total; c += 64u) {
        var m = 0.0;
        for (var k = 0u; k < ex.chunks; k++) {
            m += partial_in[(image * ex.chunks + k) * c_total + c];
        }
        s = fma(w1[h * c_total + c], m, s);
    }
    tree[li] = s;
    workgroupBarrier();
    for (var half = 32u; half > 0u; half >>= 1u) {
        if li < half {
            tree[li] += tree[li + half];
        }
        workgroupBarrier();
    }
    if li == 0u {
        hidden_out[image * ex.hidden + h] = activate(tree[0] + b1[h], MID_ACT);
    }
}

@compute @workgroup_size(64, 1, 1)
fn excite_gate(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let c = folded_index(wid, groups) * 64u + li;
    if c >= ex.channels {
        return;
    }
    let image = wid.z;
    var s = 0.0;
    for (var h = 0u; h < ex.hidden; h++) {
        s = fma(w2t[h * ex.channels + c], hidden_in[image * ex.hidden + h], s);
    }
    gate[image * ex.channels + c] = sigmoid(s + b2[c]);
}
