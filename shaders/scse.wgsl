// Decoder attention (scSE): y[p, c] = x[p, c] * cgate[c] + x[p, c] * sgate[p].
// The channel gate comes from squeeze_excite.wgsl (`excite` with a relu in the middle);
// this file has the spatial gate and the apply step.
//
// `spatial_gate`: sgate[p] = sigmoid(wsse . x[p, :] + bsse), one invocation per pixel. With
// INPUT_UP_CONCAT the input is the decoder's nearest-x2 upsample of `x` (ca channels)
// concatenated with `skip`, read in place (the concatenation is never written).
// `apply`: the gated tensor, written only where a later op needs it materialized (the
// block outputs); where a conv consumes it the gates are folded into the conv's input.

override INPUT_MODE: u32 = INPUT_PLAIN;

struct GateParams {
    h: u32,
    w: u32,
    cin: u32,
    ca: u32,
    bias: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

struct ApplyParams {
    pixels: u32,
    channels: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> gp: GateParams;
@group(0) @binding(1) var<storage, read> x: array<store>;
@group(0) @binding(2) var<storage, read> skip: array<store>;
@group(0) @binding(3) var<storage, read> wsse: array<f32>;
@group(0) @binding(4) var<storage, read_write> sgate_out: array<f32>;

@group(0) @binding(5) var<uniform> ap: ApplyParams;
@group(0) @binding(6) var<storage, read> xa: array<store>;
@group(0) @binding(7) var<storage, read> cgate: array<f32>;
@group(0) @binding(8) var<storage, read> sgate: array<f32>;
@group(0) @binding(9) var<storage, read_write> y: array<store>;

@compute @workgroup_size(64, 1, 1)
fn spatial_gate(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let p = folded_index(wid, groups) * 64u + li;
    if p >= gp.h * gp.w {
        return;
    }
    // Workgroup z: the image of the batch.
    let image = wid.z;
    let pixels = gp.h * gp.w;
    var s = 0.0;
    if INPUT_MODE == INPUT_PLAIN {
        let base = image * pixels * gp.cin;
        for (var c = 0u; c < gp.cin; c++) {
            s = fma(f32(x[base + p * gp.cin + c]), wsse[c], s);
        }
    } else {
        let low = upsampled_source(p / gp.w, p % gp.w, gp.w);
        let base = image * (gp.h / 2u) * (gp.w / 2u) * gp.ca;
        for (var c = 0u; c < gp.ca; c++) {
            s = fma(f32(x[base + low * gp.ca + c]), wsse[c], s);
        }
        let cs = gp.cin - gp.ca;
        let skip_base = image * pixels * cs;
        for (var c = 0u; c < cs; c++) {
            s = fma(f32(skip[skip_base + p * cs + c]), wsse[gp.ca + c], s);
        }
    }
    sgate_out[image * pixels + p] = sigmoid(s + gp.bias);
}

@compute @workgroup_size(64, 1, 1)
fn apply(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let i = folded_index(wid, groups) * 64u + li;
    if i >= ap.pixels * ap.channels {
        return;
    }
    let image = wid.z;
    let at = image * ap.pixels * ap.channels + i;
    let v = f32(xa[at]);
    let cg = cgate[image * ap.channels + i % ap.channels];
    y[at] = store(v * cg + v * sgate[image * ap.pixels + i / ap.channels]);
}
