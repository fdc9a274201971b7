//! The WGSL files against the Rust side, parsed with naga on the CPU (no device needed).

use super::*;
use crate::gpu::device::shader_source;
use crate::graph::Precision;

const FAMILIES: [Family; 8] = [
    Family::Conv,
    Family::Depthwise,
    Family::SqueezeExcite,
    Family::Scse,
    Family::Align,
    Family::Head,
    Family::Cast,
    Family::Winograd,
];

fn parse(family: Family, precision: Precision) -> naga::Module {
    let source = shader_source(family, precision);
    naga::front::wgsl::parse_str(&source)
        .unwrap_or_else(|e| panic!("{family:?} ({precision:?}):\n{}", e.emit_to_string(&source)))
}

fn scalar(module: &naga::Module, ty: naga::Handle<naga::Type>) -> Scalar {
    match module.types[ty].inner {
        naga::TypeInner::Scalar(naga::Scalar::U32) => Scalar::U32,
        naga::TypeInner::Scalar(naga::Scalar::F32) => Scalar::F32,
        naga::TypeInner::Scalar(naga::Scalar::BOOL) => Scalar::Bool,
        ref other => panic!("no Rust counterpart for the WGSL type {other:?}"),
    }
}

/// One kernel's entry point, uniform struct and override constants against its WGSL file;
/// returns the overrides it sets.
fn check<K: Kernel>() -> Vec<(&'static str, Scalar)> {
    let module = parse(K::FAMILY, Precision::F32);
    let what = format!("{:?}::{}", K::FAMILY, K::ENTRY);
    assert!(
        module.entry_points.iter().any(|e| e.name == K::ENTRY),
        "{what}: no such entry point"
    );
    check_uniform::<K>(&module, &what);
    check_overrides::<K>(&module, &what);
    K::Overrides::DECLARED.to_vec()
}

/// The uniform at `K::BINDING`: names, order, offsets and types of the fields, and size.
fn check_uniform<K: Kernel>(module: &naga::Module, what: &str) {
    let binding = naga::ResourceBinding {
        group: 0,
        binding: K::BINDING,
    };
    let (_, uniform) = module
        .global_variables
        .iter()
        .find(|(_, v)| v.space == naga::AddressSpace::Uniform && v.binding == Some(binding))
        .unwrap_or_else(|| panic!("{what}: no uniform at binding {}", K::BINDING));
    let ty = &module.types[uniform.ty];
    assert_eq!(ty.name.as_deref(), Some(K::STRUCT), "{what}: uniform type");
    let naga::TypeInner::Struct { ref members, span } = ty.inner else {
        panic!("{what}: the uniform is not a struct");
    };
    // Padding (`_pad*`) may only follow the fields; the Rust struct leaves it out.
    let is_padding =
        |m: &naga::StructMember| m.name.as_deref().is_some_and(|n| n.starts_with("_pad"));
    let (fields, padding) =
        members.split_at(members.iter().position(is_padding).unwrap_or(members.len()));
    let wgsl_fields: Vec<(&str, usize, Scalar)> = fields
        .iter()
        .map(|m| {
            (
                m.name.as_deref().unwrap_or(""),
                m.offset as usize,
                scalar(module, m.ty),
            )
        })
        .collect();
    let rust_fields: Vec<(&str, usize, Scalar)> = K::FIELDS
        .iter()
        .map(|f| (f.name, f.offset, f.scalar))
        .collect();
    assert_eq!(
        wgsl_fields,
        rust_fields,
        "{what}: {} fields (name, offset, type)",
        K::STRUCT
    );
    assert!(
        padding.iter().all(is_padding),
        "{what}: a field after the padding"
    );
    let (rust, wgsl) = (std::mem::size_of::<K>(), span as usize);
    assert!(
        rust <= wgsl && wgsl <= UNIFORM_BYTES,
        "{what}: Rust {rust} bytes, WGSL {wgsl}, slot {UNIFORM_BYTES}"
    );
}

fn check_overrides<K: Kernel>(module: &naga::Module, what: &str) {
    let declared: Vec<(&str, Scalar)> = module
        .overrides
        .iter()
        .map(|(_, o)| (o.name.as_deref().unwrap_or(""), scalar(module, o.ty)))
        .collect();
    let names: Vec<&str> = K::Overrides::DECLARED.iter().map(|&(n, _)| n).collect();
    assert!(
        names.is_sorted(),
        "{what}: overrides out of order (pipeline keys sort them)"
    );
    for &(name, ty) in K::Overrides::DECLARED {
        assert!(
            declared.contains(&(name, ty)),
            "{what}: override {name}: {ty:?} is not in the WGSL file (it has {declared:?})"
        );
    }
}

#[test]
fn uniform_structs_and_overrides_match_the_wgsl_files() {
    let kernels = [
        (Family::Conv, check::<ConvParams>()),
        (Family::Conv, check::<ReduceParams>()),
        (Family::Depthwise, check::<DepthwiseParams>()),
        (Family::SqueezeExcite, check::<ChannelSumParams>()),
        (Family::SqueezeExcite, check::<ExciteHiddenParams>()),
        (Family::SqueezeExcite, check::<ExciteGateParams>()),
        (Family::Scse, check::<SpatialGateParams>()),
        (Family::Scse, check::<ScseApplyParams>()),
        (Family::Align, check::<AlignParams>()),
        (Family::Head, check::<HeadParams>()),
        (Family::Cast, check::<ToStoreParams>()),
        (Family::Cast, check::<ToF32Params>()),
        (Family::Winograd, check::<WinogradInputParams>()),
        (Family::Winograd, check::<WinogradOutputParams>()),
    ];
    // Every override a file declares is set by some kernel of its family.
    for family in FAMILIES {
        let module = parse(family, Precision::F32);
        for (_, o) in module.overrides.iter() {
            let name = o.name.as_deref().unwrap_or("");
            let set = kernels
                .iter()
                .any(|(f, overrides)| *f == family && overrides.iter().any(|&(n, _)| n == name));
            assert!(set, "{family:?}: override {name} is never set from Rust");
        }
    }
}

#[test]
fn every_shader_passes_naga_validation_in_both_precisions() {
    for family in FAMILIES {
        for precision in [Precision::F32, Precision::F16] {
            let module = parse(family, precision);
            let mut validator = naga::valid::Validator::new(
                naga::valid::ValidationFlags::all(),
                naga::valid::Capabilities::all(),
            );
            if let Err(e) = validator.validate(&module) {
                let source = shader_source(family, precision);
                panic!("{family:?} ({precision:?}):\n{}", e.emit_to_string(&source));
            }
        }
    }
}

#[test]
fn codes_are_distinct_and_the_header_declares_each() {
    let header = wgsl_constants();
    for (i, &(a, name)) in ACTIVATIONS.iter().enumerate() {
        assert_eq!(a.word(), i as u32);
        assert!(header.contains(&format!("const {name}: u32 = {i}u;")));
    }
    for (i, &(m, name)) in INPUT_MODES.iter().enumerate() {
        assert_eq!(m.word(), i as u32);
        assert!(header.contains(&format!("const {name}: u32 = {i}u;")));
    }
    // A new variant must get a code (this match stops compiling without one).
    for a in ACTIVATIONS.map(|(a, _)| a) {
        match a {
            Activation::Identity | Activation::Relu | Activation::Swish | Activation::Sigmoid => {}
        }
    }
}

#[test]
fn uniform_words_are_the_fields_then_zeros() {
    let p = HeadParams {
        pixels: 7,
        cin: 3,
        bias: -0.5,
    };
    let words = p.uniform_words();
    assert_eq!(words[..3], [7, 3, (-0.5f32).to_bits()]);
    assert!(words[3..].iter().all(|&w| w == 0));
}
