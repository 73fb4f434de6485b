//! The stage graph drawn as boxes in columns (one column per layer, left to right) with
//! arrows between them.
//!
//! An edge leaves a box on its right, runs to the middle of the gap after the box's column,
//! turns up or down to the target's row and enters the target from the left with `▶`. An
//! edge that skips columns or goes back (a routing loop) drops to a lane below every box,
//! runs along it to the gap before its target, and rises there. Lines are kept as
//! up/down/left/right bits per cell, so lines that meet become `┬ ┤ ┼ ...` junctions.

use crate::format;
use crate::scene::Scene;
use crate::status::status_of;
use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::style::{Color, Modifier, Style};

const UP: u8 = 1;
const DOWN: u8 = 2;
const LEFT: u8 = 4;
const RIGHT: u8 = 8;
/// Lanes below the boxes for edges that skip columns; more such edges share the last one.
const MAX_LANES: usize = 3;

/// How boxes are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Three rows: name in the top border, executor inside, throughput in the bottom border.
    Full,
    /// One row: `[name]`.
    Compact,
}

impl Mode {
    fn box_height(self) -> u16 {
        match self {
            Mode::Full => 3,
            Mode::Compact => 1,
        }
    }
    fn width_range(self) -> (u16, u16) {
        match self {
            Mode::Full => (8, 26),
            Mode::Compact => (5, 22),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Placed {
    x: u16,
    y: u16,
    w: u16,
    h: u16,
}

impl Placed {
    fn mid(&self) -> u16 {
        self.y + self.h / 2
    }
}

/// Where everything goes, relative to the drawing's top-left corner.
#[derive(Debug)]
pub(crate) struct Plan {
    mode: Mode,
    gap: u16,
    boxes: Vec<Placed>,
    /// Lane of each edge that needs one (same order as the scene's edges).
    lanes: Vec<Option<u16>>,
    width: u16,
    height: u16,
    names_fit: bool,
}

impl Plan {
    /// Lays the scene out in at most `width` columns; `None` if the columns cannot fit.
    pub(crate) fn new(scene: &Scene, width: u16, mode: Mode) -> Option<Plan> {
        let n = scene.stages.len();
        if n == 0 {
            return None;
        }
        let layers = scene.stages.iter().map(|s| s.layer).max().unwrap_or(0) + 1;
        let mut columns: Vec<Vec<usize>> = vec![Vec::new(); layers];
        for (i, s) in scene.stages.iter().enumerate() {
            columns[s.layer].push(i);
        }
        // Empty layers (possible with loops) take no room.
        let used: Vec<usize> = (0..layers).filter(|l| !columns[*l].is_empty()).collect();
        let mut col_of_layer = vec![0usize; layers];
        for (c, l) in used.iter().enumerate() {
            col_of_layer[*l] = c;
        }
        let ncols = used.len();
        let col = |i: usize| col_of_layer[scene.stages[i].layer];
        let long: Vec<bool> = scene
            .edges
            .iter()
            .map(|&(u, v)| u >= n || v >= n || col(v) != col(u) + 1)
            .collect();
        let valid = |&(u, v): &(usize, usize)| u < n && v < n;
        let (min_w, max_w) = mode.width_range();
        let natural: Vec<u16> = used
            .iter()
            .map(|l| {
                columns[*l]
                    .iter()
                    .map(|&i| natural_width(scene, i, mode))
                    .max()
                    .unwrap_or(min_w)
                    .clamp(min_w, max_w)
            })
            .collect();
        // The wide gap if every name still fits with it, else the narrow one.
        let mut fallback = None;
        for gap in [5u16, 3] {
            // Room before the first column / after the last for lanes that enter / leave there.
            let lead = scene
                .edges
                .iter()
                .zip(&long)
                .any(|(e, l)| *l && valid(e) && col(e.1) == 0);
            let trail = scene
                .edges
                .iter()
                .zip(&long)
                .any(|(e, l)| *l && valid(e) && col(e.0) + 1 == ncols);
            let fixed =
                gap * (ncols as u16 - 1) + if lead { gap } else { 0 } + if trail { gap } else { 0 };
            if fixed + min_w * ncols as u16 > width {
                continue;
            }
            let mut widths = natural.clone();
            // Shrink the widest columns until everything fits.
            while fixed + widths.iter().sum::<u16>() > width {
                let widest = widths
                    .iter()
                    .enumerate()
                    .max_by_key(|(_, w)| **w)
                    .map(|(i, _)| i)
                    .unwrap_or(0);
                widths[widest] -= 1;
            }
            let bh = mode.box_height();
            let heights: Vec<u16> = used
                .iter()
                .map(|l| columns[*l].len() as u16 * (bh + 1) - 1)
                .collect();
            let max_h = heights.iter().copied().max().unwrap_or(0);
            let mut boxes = vec![
                Placed {
                    x: 0,
                    y: 0,
                    w: 0,
                    h: 0
                };
                n
            ];
            let mut x = if lead { gap } else { 0 };
            for (c, l) in used.iter().enumerate() {
                let mut y = (max_h - heights[c]) / 2;
                for &i in &columns[*l] {
                    boxes[i] = Placed {
                        x,
                        y,
                        w: widths[c],
                        h: bh,
                    };
                    y += bh + 1;
                }
                x += widths[c] + gap;
            }
            let mut lanes = Vec::with_capacity(scene.edges.len());
            let mut next = 0u16;
            for (e, l) in scene.edges.iter().zip(&long) {
                if *l && valid(e) {
                    lanes.push(Some(max_h + next));
                    next = (next + 1).min(MAX_LANES as u16 - 1);
                } else {
                    lanes.push(None);
                }
            }
            let lanes_used = lanes.iter().flatten().map(|y| y - max_h + 1).max();
            let frame = match mode {
                Mode::Full => 4,
                Mode::Compact => 2,
            };
            let names_fit = scene
                .stages
                .iter()
                .zip(&boxes)
                .all(|(st, b)| st.name.chars().count() + frame <= b.w as usize);
            let width = x - gap + if trail { gap } else { 0 };
            let plan = Plan {
                mode,
                gap,
                boxes,
                lanes,
                width,
                height: max_h + lanes_used.unwrap_or(0),
                names_fit,
            };
            if names_fit {
                return Some(plan);
            }
            fallback = Some(plan);
        }
        fallback
    }

    /// Whether every stage name fits in its box (boxes are narrowed to fit the width).
    pub(crate) fn names_fit(&self) -> bool {
        self.names_fit
    }

    /// Rows the drawing needs.
    pub(crate) fn height(&self) -> u16 {
        self.height
    }

    /// Draws the graph into `area` (clipped to it), centred horizontally.
    pub(crate) fn render(&self, scene: &Scene, area: Rect, buf: &mut Buffer) {
        let ox = area.x + area.width.saturating_sub(self.width) / 2;
        let oy = area.y;
        let mut canvas = Canvas {
            area,
            ox,
            oy,
            bits: vec![0; self.width as usize * self.height as usize],
            w: self.width,
            h: self.height,
        };
        let half = (self.gap - 1) / 2;
        let mut arrows = Vec::new();
        for (k, &(u, v)) in scene.edges.iter().enumerate() {
            if u >= self.boxes.len() || v >= self.boxes.len() {
                continue;
            }
            let (a, b) = (self.boxes[u], self.boxes[v]);
            let out_x = a.x + a.w;
            let arrow_x = b.x - 1;
            let mut points = vec![(out_x, a.mid()), (out_x + half, a.mid())];
            if let Some(lane) = self.lanes[k] {
                points.push((out_x + half, lane));
                points.push((arrow_x - half, lane));
            }
            points.push((arrow_x - half, b.mid()));
            points.push((arrow_x - 1, b.mid()));
            for pair in points.windows(2) {
                canvas.segment(pair[0], pair[1]);
            }
            canvas.add(arrow_x - 1, b.mid(), RIGHT);
            arrows.push((arrow_x, b.mid()));
        }
        let line = Style::default().fg(Color::DarkGray);
        for y in 0..canvas.h {
            for x in 0..canvas.w {
                let bits = canvas.bits[y as usize * canvas.w as usize + x as usize];
                if bits != 0 {
                    canvas.put(buf, x, y, glyph(bits), line);
                }
            }
        }
        for (x, y) in arrows {
            canvas.put(buf, x, y, '▶', Style::default().fg(Color::Cyan));
        }
        for (i, b) in self.boxes.iter().enumerate() {
            self.draw_box(scene, i, *b, &canvas, buf);
        }
    }

    fn draw_box(&self, scene: &Scene, i: usize, b: Placed, canvas: &Canvas, buf: &mut Buffer) {
        let st = &scene.stages[i];
        let shown = status_of(st);
        let border = Style::default().fg(shown.color());
        let name_style = Style::default().add_modifier(Modifier::BOLD);
        let w = b.w as usize;
        match self.mode {
            Mode::Compact => {
                let name = format::fit(&st.name, w.saturating_sub(2));
                canvas.put(buf, b.x, b.y, '[', border);
                canvas.text(buf, b.x + 1, b.y, &format!("{name:<0$}", w - 2), name_style);
                canvas.put(buf, b.x + b.w - 1, b.y, ']', border);
            }
            Mode::Full => {
                let inner = w - 2;
                // Top border: name.
                let name = format::fit(&st.name, inner.saturating_sub(2).max(1));
                let top_fill = inner.saturating_sub(name.chars().count() + 2);
                canvas.text(buf, b.x, b.y, "┌ ", border);
                canvas.text(buf, b.x + 2, b.y, &name, name_style);
                let after = b.x + 2 + name.chars().count() as u16;
                canvas.text(
                    buf,
                    after,
                    b.y,
                    &format!(" {}┐", "─".repeat(top_fill)),
                    border,
                );
                // Middle: executor.
                let exec = executor_label(&st.executor, inner.saturating_sub(2).max(1));
                canvas.text(buf, b.x, b.y + 1, "│", border);
                canvas.text(
                    buf,
                    b.x + 1,
                    b.y + 1,
                    &format!(" {exec:<0$}", inner - 1),
                    Style::default(),
                );
                canvas.text(buf, b.x + b.w - 1, b.y + 1, "│", border);
                // Bottom border: throughput.
                let label =
                    format::fit(&format::rate(st.throughput), inner.saturating_sub(2).max(1));
                let bottom_fill = inner.saturating_sub(label.chars().count() + 2);
                canvas.text(buf, b.x, b.y + 2, "└ ", border);
                canvas.text(
                    buf,
                    b.x + 2,
                    b.y + 2,
                    &label,
                    Style::default().fg(shown.color()),
                );
                let after = b.x + 2 + label.chars().count() as u16;
                canvas.text(
                    buf,
                    after,
                    b.y + 2,
                    &format!(" {}┘", "─".repeat(bottom_fill)),
                    border,
                );
            }
        }
    }
}

/// The executor as it fits in `width` columns: `threads(4)`, else `thr(4)`, else cut.
fn executor_label(exec: &str, width: usize) -> String {
    if exec.chars().count() <= width {
        return exec.to_string();
    }
    let short = exec
        .replacen("threads(", "thr(", 1)
        .replacen("cow_fork(", "cow(", 1)
        .replacen("ipc_fork(", "ipc(", 1);
    format::fit(&short, width)
}

/// Width a stage's box would like.
fn natural_width(scene: &Scene, i: usize, mode: Mode) -> u16 {
    let st = &scene.stages[i];
    let name = st.name.chars().count();
    let w = match mode {
        Mode::Compact => name + 2,
        Mode::Full => {
            let rate = format::rate(st.throughput).chars().count();
            (name + 4)
                .max(st.executor.chars().count() + 4)
                .max(rate + 4)
        }
    };
    w.min(u16::MAX as usize) as u16
}

/// The line glyph for a set of directions.
fn glyph(bits: u8) -> char {
    match bits {
        b if b == UP | DOWN || b == UP || b == DOWN => '│',
        b if b == LEFT | RIGHT || b == LEFT || b == RIGHT => '─',
        b if b == DOWN | RIGHT => '┌',
        b if b == DOWN | LEFT => '┐',
        b if b == UP | RIGHT => '└',
        b if b == UP | LEFT => '┘',
        b if b == UP | DOWN | RIGHT => '├',
        b if b == UP | DOWN | LEFT => '┤',
        b if b == DOWN | LEFT | RIGHT => '┬',
        b if b == UP | LEFT | RIGHT => '┴',
        _ => '┼',
    }
}

/// Line bits of the drawing, and the clipped mapping to the screen.
struct Canvas {
    area: Rect,
    ox: u16,
    oy: u16,
    bits: Vec<u8>,
    w: u16,
    h: u16,
}

impl Canvas {
    fn add(&mut self, x: u16, y: u16, bits: u8) {
        if x < self.w && y < self.h {
            self.bits[y as usize * self.w as usize + x as usize] |= bits;
        }
    }

    fn segment(&mut self, (x0, y0): (u16, u16), (x1, y1): (u16, u16)) {
        if (x0, y0) == (x1, y1) {
            return;
        }
        if y0 == y1 {
            let (a, b) = (x0.min(x1), x0.max(x1));
            self.add(a, y0, RIGHT);
            self.add(b, y0, LEFT);
            for x in a + 1..b {
                self.add(x, y0, LEFT | RIGHT);
            }
        } else {
            // Only horizontal and vertical segments are ever asked for.
            let (a, b) = (y0.min(y1), y0.max(y1));
            self.add(x0, a, DOWN);
            self.add(x0, b, UP);
            for y in a + 1..b {
                self.add(x0, y, UP | DOWN);
            }
        }
    }

    fn put(&self, buf: &mut Buffer, x: u16, y: u16, c: char, style: Style) {
        let (sx, sy) = (self.ox + x, self.oy + y);
        if sx < self.area.right() && sy < self.area.bottom() {
            if let Some(cell) = buf.cell_mut((sx, sy)) {
                cell.set_char(c).set_style(style);
            }
        }
    }

    fn text(&self, buf: &mut Buffer, x: u16, y: u16, s: &str, style: Style) {
        for (k, c) in s.chars().enumerate() {
            self.put(buf, x + k as u16, y, c, style);
        }
    }
}

/// The graph as text, for when the boxes cannot fit: layers joined by `▶`, the stages of a
/// layer separated by commas, wrapped to the width. Returns each word with its place.
fn list_words(scene: &Scene, width: u16) -> Vec<(u16, u16, String, Style)> {
    let layers = scene
        .stages
        .iter()
        .map(|s| s.layer)
        .max()
        .map_or(0, |l| l + 1);
    let mut words: Vec<(String, Style)> = Vec::new();
    for l in 0..layers {
        let stages: Vec<_> = scene.stages.iter().filter(|s| s.layer == l).collect();
        for (k, st) in stages.iter().enumerate() {
            if k == 0 && !words.is_empty() {
                words.push(("▶ ".to_string(), Style::default().fg(Color::Cyan)));
            }
            let comma = if k + 1 < stages.len() { "," } else { "" };
            let style = Style::default()
                .fg(status_of(st).color())
                .add_modifier(Modifier::BOLD);
            words.push((format!("{}{comma} ", st.name), style));
        }
    }
    let (mut x, mut y) = (0u16, 0u16);
    let mut placed = Vec::with_capacity(words.len());
    for (k, (word, style)) in words.iter().enumerate() {
        let w = word.chars().count() as u16;
        // An arrow stays on the line of the stage before it; a trailing space may hang past
        // the edge.
        let glued = words
            .get(k + 1)
            .filter(|(next, _)| next.starts_with('▶'))
            .map_or(0, |(next, _)| next.chars().count() as u16);
        let arrow = word.starts_with('▶');
        if !arrow && x > 0 && x + w + glued > width + 1 {
            x = 0;
            y += 1;
        }
        placed.push((
            x,
            y,
            format::fit(word, width.saturating_sub(x) as usize),
            *style,
        ));
        x = x.saturating_add(w);
    }
    placed
}

/// Rows the text form of the graph needs at this width.
pub(crate) fn list_height(scene: &Scene, width: u16) -> u16 {
    list_words(scene, width).last().map_or(0, |w| w.1 + 1)
}

/// Draws the text form of the graph.
pub(crate) fn render_list(scene: &Scene, area: Rect, buf: &mut Buffer) {
    for (x, y, word, style) in list_words(scene, area.width) {
        if y >= area.height {
            break;
        }
        buf.set_string(area.x + x, area.y + y, &word, style);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executors_shorten_to_fit() {
        assert_eq!(executor_label("threads(4)", 10), "threads(4)");
        assert_eq!(executor_label("threads(4)", 7), "thr(4)");
        assert_eq!(executor_label("ipc_fork(12)", 7), "ipc(12)");
        assert_eq!(executor_label("cow_fork(4)", 4), "cow…");
    }

    #[test]
    fn junction_glyphs() {
        assert_eq!(glyph(UP | DOWN), '│');
        assert_eq!(glyph(LEFT | UP | DOWN), '┤');
        assert_eq!(glyph(RIGHT | UP | DOWN), '├');
        assert_eq!(glyph(UP | DOWN | LEFT | RIGHT), '┼');
        assert_eq!(glyph(DOWN | RIGHT), '┌');
    }
}
