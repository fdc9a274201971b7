// Shared by every kernel family. The Rust side prepends one fixed header that defines
// `store` (f32, or f16 with `enable f16;`): the storage type of activations and conv weights.
// Arithmetic is always f32. The header also declares the activation codes `ACT_*` and the
// input modes `INPUT_*` (src/gpu/params.rs is their one definition).

// Workgroups beyond 65535 in x are folded into y; this recovers the linear index.
fn folded_index(wid: vec3<u32>, groups: vec3<u32>) -> u32 {
    return wid.x + wid.y * groups.x;
}

fn sigmoid(x: f32) -> f32 {
    return 1.0 / (1.0 + exp(-x));
}

fn activate(x: f32, act: u32) -> f32 {
    switch act {
        case ACT_RELU: { return max(x, 0.0); }
        case ACT_SWISH: { return x * sigmoid(x); }
        case ACT_SIGMOID: { return sigmoid(x); }
        default: { return x; }
    }
}

// Index of the low-resolution pixel that nearest-x2 upsampling copies to (iy, ix).
fn upsampled_source(iy: u32, ix: u32, full_w: u32) -> u32 {
    return (iy / 2u) * (full_w / 2u) + ix / 2u;
}
