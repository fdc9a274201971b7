// Soft feature alignment, one fused kernel per level (flash-attention style):
//   y[i, 0..cin]      = fq[i, :]
//   y[i, cin..2 cin]  = sum_j softmax_j(q[i, :] . k[j, :]) * fp[j, :]      (no 1/sqrt(d))
// One workgroup per ROWS query positions walks the prompt positions j in tiles of 64: each
// invocation computes one key's logits for all ROWS queries (the key row is read once for
// them), the tile's max and sum come from workgroup reductions, the running max/sum rescale
// the accumulators (online softmax: every exponent is logit - running max <= 0, so logits in
// the thousands are safe), and each invocation accumulates up to 8 output channels of all
// ROWS queries (each prompt feature read once for them). Nothing n x n is ever stored. The
// weighted sum is two-level (per tile, then into the running total), as accurate as a
// blocked GEMM. The ROWS queries of a workgroup are the lanes of a vec4.

// Batch: workgroup z is the image; fq, q and y hold one block per image, k and fp too
// unless `shared_keys` (one prompt for the whole batch).
struct Params {
    n: u32,
    cin: u32,
    hidden: u32,
    shared_keys: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> fq: array<store>;
@group(0) @binding(2) var<storage, read> q: array<store>;
@group(0) @binding(3) var<storage, read> k: array<store>;
@group(0) @binding(4) var<storage, read> fp: array<store>;
@group(0) @binding(5) var<storage, read_write> y: array<store>;

const WG: u32 = 64u;
// Query positions per workgroup, 1 to 4 (src/gpu/lower.rs: align_rows).
override ROWS: u32 = 4u;
// Rust checks hidden <= 256 and cin <= 8 * 64 before dispatching.
const CHANNELS_PER_INVOCATION: u32 = 8u;

// qrows[h]: lane r is query row r's h-th projection (0 for rows past n).
var<workgroup> qrows: array<vec4<f32>, 256>;
var<workgroup> probs: array<vec4<f32>, 64>;
var<workgroup> red: array<vec4<f32>, 64>;

fn reduce_max(v: vec4<f32>, li: u32) -> vec4<f32> {
    red[li] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s /= 2u) {
        if li < s {
            red[li] = max(red[li], red[li + s]);
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

fn reduce_sum(v: vec4<f32>, li: u32) -> vec4<f32> {
    red[li] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s /= 2u) {
        if li < s {
            red[li] = red[li] + red[li + s];
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

var<private> k_base: u32;
var<private> fp_base: u32;

// Key j's logits against the workgroup's ROWS queries.
fn logits(j: u32) -> vec4<f32> {
    let base = k_base + j * params.hidden;
    var s = vec4<f32>(0.0);
    for (var h = 0u; h < params.hidden; h++) {
        s = fma(qrows[h], vec4<f32>(f32(k[base + h])), s);
    }
    return s;
}

@compute @workgroup_size(64, 1, 1)
fn soft_align(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let i0 = folded_index(wid, groups) * ROWS;
    if i0 >= params.n {
        return;
    }
    let n = params.n;
    let cin = params.cin;
    let image = wid.z;
    let own = image * (1u - min(params.shared_keys, 1u));
    k_base = own * n * params.hidden;
    fp_base = own * n * cin;
    // This image's query rows, as rows of the batch.
    let r0 = image * n + i0;
    let rows = min(ROWS, n - i0);
    for (var h = li; h < params.hidden; h += WG) {
        var v = vec4<f32>(0.0);
        for (var r = 0u; r < rows; r++) {
            v[r] = f32(q[(r0 + r) * params.hidden + h]);
        }
        qrows[h] = v;
    }
    for (var r = 0u; r < rows; r++) {
        for (var c = li; c < cin; c += WG) {
            y[(r0 + r) * 2u * cin + c] = fq[(r0 + r) * cin + c];
        }
    }
    workgroupBarrier();

    var m = vec4<f32>(-3.0e38);
    var l = vec4<f32>(0.0);
    var acc: array<vec4<f32>, 8>;
    for (var t0 = 0u; t0 < n; t0 += WG) {
        let j = t0 + li;
        var z = vec4<f32>(-3.0e38);
        if j < n {
            z = logits(j);
        }
        let m_new = max(m, reduce_max(z, li));
        var p = vec4<f32>(0.0);
        if j < n {
            p = exp(z - m_new);
        }
        probs[li] = p;
        let tile_sum = reduce_sum(p, li);
        let scale = exp(m - m_new);
        l = l * scale + tile_sum;
        let keys = min(WG, n - t0);
        for (var r = 0u; r < CHANNELS_PER_INVOCATION; r++) {
            let c = li + r * WG;
            if c < cin {
                var s = vec4<f32>(0.0);
                for (var jj = 0u; jj < keys; jj++) {
                    s = fma(probs[jj], vec4<f32>(f32(fp[fp_base + (t0 + jj) * cin + c])), s);
                }
                acc[r] = acc[r] * scale + s;
            }
        }
        m = m_new;
    }
    for (var r = 0u; r < CHANNELS_PER_INVOCATION; r++) {
        let c = li + r * WG;
        if c < cin {
            let out = acc[r] / l;
            for (var row = 0u; row < rows; row++) {
                y[(r0 + row) * 2u * cin + cin + c] = store(out[row]);
            }
        }
    }
}
