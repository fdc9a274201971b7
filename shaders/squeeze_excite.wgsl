// Squeeze-excite gates, shared by EfficientNet's SE (middle activation swish) and the
// decoder scSE's channel branch (middle activation relu):
//   gate[c] = sigmoid(w2[c, :] . act(w1 . mean_hw(x) + b1) + b2[c])
// Only the gate is written: the scaling itself is folded into the next conv's input.
//
// `channel_sums` reduces a chunk of pixels per workgroup row (adjacent invocations read
// adjacent channels), writing sum * inv_count into partial[chunk][c_off + c]; a concatenated
// input is pooled part by part (the upsampled part pools over its low-resolution source:
// nearest upsampling repeats every pixel exactly four times). `excite` adds the chunks
// (a second summation level) and runs the two small FCs in one workgroup.

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
@group(0) @binding(7) var<storage, read> w2: array<f32>;
@group(0) @binding(8) var<storage, read> b2: array<f32>;
@group(0) @binding(9) var<storage, read_write> gate: array<f32>;

const MAX_CHANNELS: u32 = 3072u;
const MAX_HIDDEN: u32 = 256u;

var<workgroup> means: array<f32, 3072>;
var<workgroup> hid: array<f32, 256>;

@compute @workgroup_size(64, 1, 1)
fn channel_sums(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let c = wid.x * 64u + li;
    if c >= sum_params.channels {
        return;
    }
    let start = wid.y * sum_params.chunk;
    let end = min(start + sum_params.chunk, sum_params.pixels);
    var s = 0.0;
    for (var p = start; p < end; p++) {
        s += f32(x[p * sum_params.channels + c]);
    }
    partial_out[wid.y * sum_params.c_total + sum_params.c_off + c] = s * sum_params.inv_count;
}

@compute @workgroup_size(256, 1, 1)
fn excite(@builtin(local_invocation_index) li: u32) {
    let c_total = ex.channels;
    for (var c = li; c < c_total; c += 256u) {
        var m = 0.0;
        for (var k = 0u; k < ex.chunks; k++) {
            m += partial_in[k * c_total + c];
        }
        means[c] = m;
    }
    workgroupBarrier();
    for (var h = li; h < ex.hidden; h += 256u) {
        var s = 0.0;
        for (var c = 0u; c < c_total; c++) {
            s = fma(w1[h * c_total + c], means[c], s);
        }
        hid[h] = activate(s + b1[h], MID_ACT);
    }
    workgroupBarrier();
    for (var c = li; c < c_total; c += 256u) {
        var s = 0.0;
        for (var h = 0u; h < ex.hidden; h++) {
            s = fma(w2[c * ex.hidden + h], hid[h], s);
        }
        gate[c] = sigmoid(s + b2[c]);
    }
}
