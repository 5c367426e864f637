//! `report.png`: the run's curves (reward, accuracy, KL, entropy, response length, held-out
//! accuracy, a PPO critic's loss; a DPO run's loss, implicit rewards and their accuracy) drawn
//! from its Parquet logs.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::logs::read_step_table;

/// DejaVu Sans Mono cut to printable ASCII (see assets/DejaVu-LICENSE).
static FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono-ascii.ttf");

fn series(columns: &[String], rows: &[(u64, Vec<f64>)], name: &str) -> Vec<(f64, f64)> {
    let Some(i) = columns.iter().position(|c| c == name) else {
        return Vec::new();
    };
    rows.iter()
        .filter(|(_, r)| r[i].is_finite())
        .map(|(s, r)| (*s as f64, r[i]))
        .collect()
}

/// One chart: a title, its x axis (steps, or named categories such as layers) and its lines.
pub struct Panel<'a> {
    pub title: &'a str,
    pub x_desc: &'a str,
    /// Names of the x positions 0, 1, … (empty: numeric x).
    pub categories: Vec<String>,
    pub lines: Vec<(&'a str, Vec<(f64, f64)>)>,
}

impl<'a> Panel<'a> {
    pub fn steps(title: &'a str, lines: Vec<(&'a str, Vec<(f64, f64)>)>) -> Self {
        Panel {
            title,
            x_desc: "step",
            categories: Vec::new(),
            lines,
        }
    }

    pub fn categories(
        title: &'a str,
        x_desc: &'a str,
        categories: Vec<String>,
        lines: Vec<(&'a str, Vec<(f64, f64)>)>,
    ) -> Self {
        Panel {
            title,
            x_desc,
            categories,
            lines,
        }
    }
}

/// Draws `dir/report.png` from `dir/metrics.parquet` and `dir/eval.parquet`.
pub fn plot(dir: &Path) -> anyhow::Result<()> {
    let (mc, mr) = read_step_table(&dir.join("metrics.parquet"))?;
    let (ec, er) = if dir.join("eval.parquet").exists() {
        read_step_table(&dir.join("eval.parquet"))?
    } else {
        (Vec::new(), Vec::new())
    };
    let pass_k = ec
        .iter()
        .find(|c| c.starts_with("pass@") && c.as_str() != "pass@1")
        .cloned()
        .unwrap_or_default();
    let held_out = || {
        vec![
            ("held-out greedy", series(&ec, &er, "greedy_accuracy")),
            ("held-out pass@1", series(&ec, &er, "pass@1")),
            ("held-out pass@k", series(&ec, &er, &pass_k)),
        ]
    };
    let panels: Vec<Panel> = if mc.iter().any(|c| c == "reward_accuracy") {
        // a DPO run
        vec![
            Panel::steps("DPO loss", vec![("loss", series(&mc, &mr, "loss"))]),
            Panel::steps("held-out accuracy", held_out()),
            Panel::steps(
                "implicit reward accuracy",
                vec![("train pairs", series(&mc, &mr, "reward_accuracy"))],
            ),
            Panel::steps(
                "implicit rewards",
                vec![
                    ("chosen", series(&mc, &mr, "chosen_reward")),
                    ("rejected", series(&mc, &mr, "rejected_reward")),
                    ("margin", series(&mc, &mr, "reward_margin")),
                ],
            ),
            Panel::steps("grad norm", vec![("norm", series(&mc, &mr, "grad_norm"))]),
            Panel::steps("learning rate", vec![("lr", series(&mc, &mr, "lr"))]),
        ]
    } else {
        let mut accuracy = vec![("train (sampled)", series(&mc, &mr, "accuracy"))];
        accuracy.extend(held_out());
        let mut panels = vec![
            Panel::steps("reward", vec![("mean", series(&mc, &mr, "reward_mean"))]),
            Panel::steps("accuracy", accuracy),
            Panel::steps(
                "KL to reference",
                vec![
                    ("loss term", series(&mc, &mr, "kl")),
                    ("in the reward (k1)", series(&mc, &mr, "reward_kl")),
                ],
            ),
            Panel::steps("entropy", vec![("entropy", series(&mc, &mr, "entropy"))]),
            Panel::steps(
                "response length",
                vec![("mean", series(&mc, &mr, "length_mean"))],
            ),
            Panel::steps(
                "clip fraction",
                vec![
                    ("low", series(&mc, &mr, "clip_low_frac")),
                    ("high", series(&mc, &mr, "clip_high_frac")),
                ],
            ),
        ];
        let value = series(&mc, &mr, "value_loss");
        if value.iter().any(|&(_, v)| v != 0.0) {
            // PPO: the critic's loss
            panels.push(Panel::steps("value loss", vec![("loss", value)]));
        }
        panels
    };
    draw(&dir.join("report.png"), &panels)
}

/// Draws panels two rows high, as many columns as they need.
pub fn draw(path: &Path, panels: &[Panel]) -> anyhow::Result<()> {
    let _ = register_font("sans-serif", FontStyle::Normal, FONT);
    let columns = panels.len().div_ceil(2);
    let root = BitMapBackend::new(path, (500 * columns as u32, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let colors = [BLUE, RED, GREEN, MAGENTA];
    for (area, panel) in root.split_evenly((2, columns)).iter().zip(panels) {
        let lines = &panel.lines;
        let points = lines.iter().flat_map(|(_, s)| s.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in points {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        if x0 > x1 {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        if !panel.categories.is_empty() {
            (x0, x1) = (-0.5, panel.categories.len() as f64 - 0.5);
        }
        let pad = ((y1 - y0) * 0.05).max(1e-6);
        let mut chart = ChartBuilder::on(area)
            .caption(panel.title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - pad)..(y1 + pad))?;
        chart
            .configure_mesh()
            .x_desc(panel.x_desc)
            .x_labels(if panel.categories.is_empty() {
                10
            } else {
                panel.categories.len() * 2 + 1
            })
            .x_label_formatter(&|x| {
                if panel.categories.is_empty() {
                    format!("{x:.0}")
                } else if (x - x.round()).abs() < 1e-6 {
                    let i = x.round();
                    (i >= 0.0)
                        .then(|| panel.categories.get(i as usize).cloned())
                        .flatten()
                        .unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|y| {
                if y1 - y0 < 0.01 {
                    format!("{y:.2e}")
                } else {
                    format!("{y:.3}")
                }
            })
            .light_line_style(WHITE.mix(0.0))
            .draw()?;
        for (i, (name, s)) in lines.iter().enumerate() {
            if s.is_empty() {
                continue;
            }
            let color = colors[i % colors.len()];
            if s.len() < 12 {
                // few points (checkpoints, layers): mark each, so a single one shows
                chart.draw_series(s.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
            }
            chart
                .draw_series(LineSeries::new(s.iter().copied(), color.stroke_width(2)))?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2))
                });
        }
        if lines.len() > 1 {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
        }
    }
    root.present().with_context(|| path.display().to_string())?;
    Ok(())
}
