// Winograd F(4x4, 3x3) for stride-1 3x3 convs (the decoder's): y = A^T [ (G g G^T) . (B^T d B) ] A
// per 4x4 output tile, which does the 3x3 conv's reduction in 36 GEMMs of 1/4 of its
// multiply-adds. Three dispatches:
//   winograd_input:  each (tile, channel) reads its 6x6 input patch (through the same input
//                    modes as conv.wgsl: plain, upsample + concat read in place, scSE gates)
//                    and writes the 36 values of B^T d B to v[image][xi][tile][channel];
//   the GEMM:        conv2d_nhwc as a 1x1 conv over 36 "images" per image, each with its own
//                    weights (G g G^T, transformed on the host), in split-K mode (raw sums);
//   winograd_output: each (tile, channel) sums the splits of its 36 products, applies A^T . A,
//                    then bias and activation, and writes the tile's in-bounds pixels.

override ACT: u32 = ACT_IDENTITY;
override INPUT_MODE: u32 = INPUT_PLAIN;

struct InputParams {
    in_h: u32,
    in_w: u32,
    cin: u32,
    ca: u32,
    tiles_h: u32,
    tiles_w: u32,
    pad_top: u32,
    pad_left: u32,
}

struct OutputParams {
    out_h: u32,
    out_w: u32,
    cout: u32,
    tiles_h: u32,
    tiles_w: u32,
    splits: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: InputParams;
@group(0) @binding(1) var<storage, read> x: array<store>;
@group(0) @binding(2) var<storage, read> skip: array<store>;
@group(0) @binding(3) var<storage, read> cgate: array<f32>;
@group(0) @binding(4) var<storage, read> sgate: array<f32>;
@group(0) @binding(5) var<storage, read_write> v: array<store>;

@group(0) @binding(6) var<uniform> op: OutputParams;
@group(0) @binding(7) var<storage, read> m: array<f32>;
@group(0) @binding(8) var<storage, read> bias: array<f32>;
@group(0) @binding(9) var<storage, read_write> y: array<store>;

// B^T d for one 6-vector.
fn input_transform(d: array<f32, 6>) -> array<f32, 6> {
    return array<f32, 6>(
        4.0 * d[0] - 5.0 * d[2] + d[4],
        -4.0 * d[1] - 4.0 * d[2] + d[3] + d[4],
        4.0 * d[1] - 4.0 * d[2] - d[3] + d[4],
        -2.0 * d[1] - d[2] + 2.0 * d[3] + d[4],
        2.0 * d[1] - d[2] - 2.0 * d[3] + d[4],
        4.0 * d[1] - 5.0 * d[3] + d[5],
    );
}

// A^T t for one 6-vector.
fn output_transform(t: array<f32, 6>) -> array<f32, 4> {
    return array<f32, 4>(
        t[0] + t[1] + t[2] + t[3] + t[4],
        t[1] - t[2] + 2.0 * t[3] - 2.0 * t[4],
        t[1] + t[2] + 4.0 * t[3] + 4.0 * t[4],
        t[1] - t[2] + 8.0 * t[3] - 8.0 * t[4] + t[5],
    );
}

// Workgroup z: the image of the batch.
@compute @workgroup_size(64, 1, 1)
fn winograd_input(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let index = folded_index(wid, groups) * 64u + li;
    let tiles = params.tiles_h * params.tiles_w;
    if index >= tiles * params.cin {
        return;
    }
    let image = wid.z;
    set_image(image);
    let tile = index / params.cin;
    let ci = index % params.cin;
    let y0 = i32((tile / params.tiles_w) * 4u) - i32(params.pad_top);
    let x0 = i32((tile % params.tiles_w) * 4u) - i32(params.pad_left);
    // Rows first: r[i] = B^T applied along x to patch row i.
    var r: array<array<f32, 6>, 6>;
    for (var i = 0; i < 6; i++) {
        var d: array<f32, 6>;
        for (var j = 0; j < 6; j++) {
            d[j] = load_input(y0 + i, x0 + j, ci);
        }
        r[i] = input_transform(d);
    }
    let base = image * 36u * tiles;
    for (var j = 0u; j < 6u; j++) {
        let col = input_transform(array<f32, 6>(r[0][j], r[1][j], r[2][j], r[3][j], r[4][j], r[5][j]));
        for (var i = 0u; i < 6u; i++) {
            let xi = i * 6u + j;
            v[((base + xi * tiles) + tile) * params.cin + ci] = store(col[i]);
        }
    }
}

// Workgroup z: the image of the batch.
@compute @workgroup_size(64, 1, 1)
fn winograd_output(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let index = folded_index(wid, groups) * 64u + li;
    let tiles = op.tiles_h * op.tiles_w;
    if index >= tiles * op.cout {
        return;
    }
    let image = wid.z;
    let tile = index / op.cout;
    let co = index % op.cout;
    // The GEMM's raw sums: m[image * 36 + xi][split][tile][co], splits added in order.
    var t: array<array<f32, 6>, 6>;
    for (var xi = 0u; xi < 36u; xi++) {
        var s = 0.0;
        for (var k = 0u; k < op.splits; k++) {
            s += m[(((image * 36u + xi) * op.splits + k) * tiles + tile) * op.cout + co];
        }
        t[xi / 6u][xi % 6u] = s;
    }
    // Columns first (A^T along y), then rows.
    var c: array<array<f32, 4>, 6>;
    for (var j = 0u; j < 6u; j++) {
        c[j] = output_transform(array<f32, 6>(t[0][j], t[1][j], t[2][j], t[3][j], t[4][j], t[5][j]));
    }
    let oy0 = (tile / op.tiles_w) * 4u;
    let ox0 = (tile % op.tiles_w) * 4u;
    let b = bias[co];
    let y_base = image * op.out_h * op.out_w;
    for (var i = 0u; i < 4u; i++) {
        let row = output_transform(array<f32, 6>(c[0][i], c[1][i], c[2][i], c[3][i], c[4][i], c[5][i]));
        let oy = oy0 + i;
        for (var j = 0u; j < 4u; j++) {
            let ox = ox0 + j;
            if oy < op.out_h && ox < op.out_w {
                y[(y_base + oy * op.out_w + ox) * op.cout + co] = store(activate(row[j] + b, ACT));
            }
        }
    }
}
