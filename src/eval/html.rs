//! `report.html`: one self-contained file (inline SVG and images, no script): the table,
//! per class the ROC and PR curves (image and pixel level) and the PRO curve up to FPR 0.3,
//! drawn from the points the metrics integrate, and a gallery of the most confident misses
//! and false alarms.

use super::metrics::METRIC_NAMES;
use super::report::{Report, NOTES};
use super::{ClassCurves, ClassResult};

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn pct(v: f64) -> String {
    if v.is_finite() {
        format!("{:.1}", v * 100.0)
    } else {
        "n/a".into()
    }
}

/// One curve as an SVG: data coordinates in [0, 1] (x right, y up) are the polyline's own
/// `points`, so a reader (or a test) can take them back exactly.
fn plot(
    title: &str,
    class: &str,
    kind: &str,
    x_label: &str,
    y_label: &str,
    x_max: f64,
    points: &Option<Vec<(f64, f64)>>,
) -> String {
    let Some(points) = points else {
        return format!(
            "<figure class=\"plot\"><figcaption>{title}: undefined</figcaption></figure>"
        );
    };
    let pts: Vec<String> = points.iter().map(|(x, y)| format!("{x},{y}")).collect();
    let grid: String = (1..5)
        .map(|i| {
            let v = f64::from(i) / 4.0;
            format!(
                "<line x1=\"0\" y1=\"{v}\" x2=\"{x_max}\" y2=\"{v}\" class=\"grid\"/><line x1=\"{}\" y1=\"0\" x2=\"{}\" y2=\"1\" class=\"grid\"/>",
                v * x_max,
                v * x_max
            )
        })
        .collect();
    format!(
        "<figure class=\"plot\"><svg viewBox=\"-0.12 -1.08 1.2 1.2\" width=\"220\" height=\"220\" role=\"img\">\
<g transform=\"scale({sx},-1)\">{grid}<rect x=\"0\" y=\"0\" width=\"{x_max}\" height=\"1\" class=\"frame\"/>\
<polyline class=\"curve {kind}\" data-class=\"{class}\" data-kind=\"{kind}\" points=\"{}\" vector-effect=\"non-scaling-stroke\"/></g>\
<text x=\"0.5\" y=\"0.1\" class=\"label\">{x_label}</text><text x=\"-0.1\" y=\"-1.0\" class=\"label\">{y_label}</text></svg>\
<figcaption>{title}</figcaption></figure>",
        pts.join(" "),
        sx = 1.0 / x_max,
        class = escape(class),
    )
}

fn curves(c: &ClassResult) -> String {
    let k: &ClassCurves = &c.curves;
    let n = &c.name;
    [
        plot("image ROC", n, "image-roc", "FPR", "TPR", 1.0, &k.image_roc),
        plot(
            "image PR",
            n,
            "image-pr",
            "recall",
            "precision",
            1.0,
            &k.image_pr,
        ),
        plot("pixel ROC", n, "pixel-roc", "FPR", "TPR", 1.0, &k.pixel_roc),
        plot(
            "pixel PR",
            n,
            "pixel-pr",
            "recall",
            "precision",
            1.0,
            &k.pixel_pr,
        ),
        plot("PRO (FPR < 0.3)", n, "pro", "FPR", "PRO", 0.3, &k.pro),
    ]
    .concat()
}

fn gallery(c: &ClassResult) -> String {
    let b64 = base64;
    c.gallery
        .iter()
        .map(|g| {
            format!(
                "<figure class=\"shot {}\"><img alt=\"{}\" src=\"data:image/png;base64,{}\"><figcaption>{} · {} · score {:.3}</figcaption></figure>",
                g.kind.replace(' ', "-"),
                escape(&g.name),
                b64(&g.png),
                g.kind,
                escape(&g.name),
                g.score
            )
        })
        .collect()
}

pub fn to_html(report: &Report) -> String {
    let info = &report.info;
    let mut s = String::from(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>MetaUAS evaluation</title><style>\
body{font:14px/1.4 system-ui,sans-serif;margin:20px;color:#1f2328}table{border-collapse:collapse}\
td,th{border:1px solid #d0d7de;padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}\
.plots,.gallery{display:flex;flex-wrap:wrap;gap:10px}.plot{margin:0}.plot svg{background:#fff;border:1px solid #d0d7de}\
.curve{fill:none;stroke:#0969da;stroke-width:2}.grid{stroke:#eaeef2;stroke-width:0.004}.frame{fill:none;stroke:#656d76;stroke-width:0.006}\
.label{font-size:0.07px;fill:#656d76}.shot{margin:0;font-size:12px}.shot img{width:128px;height:128px;display:block}\
.miss img{outline:3px solid #c62828}.false-alarm img{outline:3px solid #bf8700}</style></head><body>\n<h1>MetaUAS evaluation</h1>\n",
    );
    s.push_str(&format!(
        "<p>command <code>{}</code><br>weights <code>{}</code> ({})<br>size {} · backend {} · dataset {}</p>\n",
        escape(&info.command),
        escape(&info.weights),
        escape(&info.weights_hash),
        info.size,
        escape(&info.backend),
        escape(&info.dataset)
    ));
    s.push_str("<table><tr><th>class</th><th>images</th><th>defective</th>");
    for m in METRIC_NAMES {
        s.push_str(&format!("<th>{m}</th>"));
    }
    s.push_str("</tr>\n");
    for c in &report.classes {
        s.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td>",
            escape(&c.name),
            c.images,
            c.defective
        ));
        for v in c.metrics.values {
            s.push_str(&format!("<td>{}</td>", pct(v)));
        }
        s.push_str("</tr>\n");
    }
    s.push_str("<tr><th>mean</th><td></td><td></td>");
    for v in report.mean() {
        s.push_str(&format!("<th>{}</th>", pct(v)));
    }
    s.push_str("</tr></table>\n<p>Values in %. ");
    s.push_str(&escape(&NOTES.join(" ")));
    s.push_str("</p>\n");
    for c in &report.classes {
        s.push_str(&format!(
            "<section><h2>{}</h2><div class=\"plots\">{}</div><h3>Most confident misses and false alarms</h3><div class=\"gallery\">{}</div></section>\n",
            escape(&c.name),
            curves(c),
            gallery(c)
        ));
    }
    s.push_str("</body></html>\n");
    s
}

/// Standard padded base64 (for the inline images).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            out.push(if i <= chunk.len() {
                ALPHABET[((n >> shift) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}
