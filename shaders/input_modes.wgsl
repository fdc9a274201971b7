// The input modes of a conv's input (INPUT_PLAIN .. INPUT_UP_CONCAT_GATED, see conv.wgsl):
// shared by conv.wgsl and winograd.wgsl, which Rust prepends it to. Each file declares
// `params` (with in_h, in_w, cin, ca), `x`, `skip`, `cgate`, `sgate` and INPUT_MODE.

// Where this workgroup's image starts in each input (set once, before any load).
var<private> x_base: u32;
var<private> skip_base: u32;
var<private> cgate_base: u32;
var<private> sgate_base: u32;

fn set_image(b: u32) {
    let in_pixels = params.in_h * params.in_w;
    if INPUT_MODE == INPUT_PLAIN || INPUT_MODE == INPUT_CHANNEL_SCALED {
        x_base = b * in_pixels * params.cin;
    } else {
        x_base = b * (params.in_h / 2u) * (params.in_w / 2u) * params.ca;
    }
    skip_base = b * in_pixels * (params.cin - params.ca);
    cgate_base = b * params.cin;
    sgate_base = b * in_pixels;
}

// One element of the (virtual) input at (iy, ix, ci); zero outside the map (padding).
fn load_input(iy: i32, ix: i32, ci: u32) -> f32 {
    if iy < 0 || ix < 0 || u32(iy) >= params.in_h || u32(ix) >= params.in_w {
        return 0.0;
    }
    let pix = u32(iy) * params.in_w + u32(ix);
    if INPUT_MODE == INPUT_PLAIN {
        return f32(x[x_base + pix * params.cin + ci]);
    }
    if INPUT_MODE == INPUT_CHANNEL_SCALED {
        return f32(x[x_base + pix * params.cin + ci]) * cgate[cgate_base + ci];
    }
    var v: f32;
    if ci < params.ca {
        v = f32(x[x_base + upsampled_source(u32(iy), u32(ix), params.in_w) * params.ca + ci]);
    } else {
        let cs = params.cin - params.ca;
        v = f32(skip[skip_base + pix * cs + ci - params.ca]);
    }
    if INPUT_MODE == INPUT_UP_CONCAT_GATED {
        v = v * cgate[cgate_base + ci] + v * sgate[sgate_base + pix];
    }
    return v;
}
