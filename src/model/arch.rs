//! The fixed MetaUAS architecture: EfficientNet-b4 block table, alignment levels, decoder table.

pub const ENCODER_BN_EPS: f64 = 1e-3;
pub const DECODER_BN_EPS: f64 = 1e-5;

/// One MBConv block of the encoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MbConvSpec {
    pub kernel: usize,
    pub stride: usize,
    pub expand: usize,
    pub cin: usize,
    pub cout: usize,
}

/// EfficientNet-b4 stages: (repeats, kernel, stride of first block, expand, cin, cout).
const STAGES: [(usize, usize, usize, usize, usize, usize); 7] = [
    (2, 3, 1, 1, 48, 24),
    (4, 3, 2, 6, 24, 32),
    (4, 5, 2, 6, 32, 56),
    (6, 3, 2, 6, 56, 112),
    (6, 5, 1, 6, 112, 160),
    (8, 5, 2, 6, 160, 272),
    (2, 3, 1, 6, 272, 448),
];

/// Encoder features f2..f5 are the outputs of these blocks.
pub const FEATURE_BLOCKS: [usize; 4] = [5, 9, 21, 31];

pub fn efficientnet_b4_blocks() -> Vec<MbConvSpec> {
    let mut blocks = Vec::with_capacity(32);
    for (repeats, kernel, stride, expand, cin, cout) in STAGES {
        for r in 0..repeats {
            blocks.push(MbConvSpec {
                kernel,
                stride: if r == 0 { stride } else { 1 },
                expand,
                cin: if r == 0 { cin } else { cout },
                cout,
            });
        }
    }
    blocks
}

/// SE squeeze width: from the block's input channels, `max(1, int(cin * 0.25))`.
pub fn se_squeeze(cin: usize) -> usize {
    (cin / 4).max(1)
}

/// "Static same" padding of efficientnet-pytorch, computed for a 380 input and reused at
/// every size: stride 1 is symmetric, stride 2 pads one less before than after.
pub fn static_same_padding(kernel: usize, stride: usize) -> (usize, usize) {
    match (kernel, stride) {
        (k, 1) => ((k - 1) / 2, (k - 1) / 2),
        (3, 2) => (0, 1),
        (5, 2) => (1, 2),
        (k, s) => unreachable!("no k={k} s={s} conv in EfficientNet-b4"),
    }
}

/// A UNet decoder block: input channels from below, skip channels, output channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecoderBlockSpec {
    pub cin: usize,
    pub skip: usize,
    pub cout: usize,
}

pub const DECODER_BLOCKS: [DecoderBlockSpec; 5] = [
    DecoderBlockSpec {
        cin: 896,
        skip: 320,
        cout: 256,
    },
    DecoderBlockSpec {
        cin: 256,
        skip: 112,
        cout: 128,
    },
    DecoderBlockSpec {
        cin: 128,
        skip: 32,
        cout: 64,
    },
    DecoderBlockSpec {
        cin: 64,
        skip: 48,
        cout: 64,
    },
    DecoderBlockSpec {
        cin: 64,
        skip: 0,
        cout: 48,
    },
];

/// Alignment level i works on encoder feature f(5 - i) with this many channels.
pub const ALIGN_CHANNELS: [usize; 3] = [448, 160, 56];
