// Workgroup z: the image of a batch (`elems` values each).
// Storage-type conversions between a full-precision (f32) region of a program and its f16
// storage: one invocation per value. Built with `store` = f16 only (with f32 storage no
// program has anything to convert).

struct CastParams {
    elems: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: CastParams;
@group(0) @binding(1) var<storage, read> wide_in: array<f32>;
@group(0) @binding(2) var<storage, read_write> narrow_out: array<store>;
@group(0) @binding(3) var<storage, read> narrow_in: array<store>;
@group(0) @binding(4) var<storage, read_write> wide_out: array<f32>;

@compute @workgroup_size(256, 1, 1)
fn to_store(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let i = folded_index(wid, groups) * 256u + li;
    if i < params.elems {
        let at = wid.z * params.elems + i;
        narrow_out[at] = store(wide_in[at]);
    }
}

@compute @workgroup_size(256, 1, 1)
fn to_f32(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let i = folded_index(wid, groups) * 256u + li;
    if i < params.elems {
        let at = wid.z * params.elems + i;
        wide_out[at] = f32(narrow_in[at]);
    }
}
