// Segmentation head: a 1x1 conv to one channel and the sigmoid, one invocation per pixel.

struct Params {
    pixels: u32,
    cin: u32,
    bias: f32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<store>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<store>;

@compute @workgroup_size(64, 1, 1)
fn head_sigmoid(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let p = folded_index(wid, groups) * 64u + li;
    if p >= params.pixels {
        return;
    }
    // Workgroup z: the image of the batch.
    let at = wid.z * params.pixels + p;
    var s = 0.0;
    for (var c = 0u; c < params.cin; c++) {
        s = fma(f32(x[at * params.cin + c]), w[c], s);
    }
    y[at] = store(sigmoid(s + params.bias));
}
