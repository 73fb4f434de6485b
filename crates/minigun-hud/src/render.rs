//! The pure render function: one [`Scene`] and one [`ViewState`] in, one frame out. No I/O,
//! no clock: the same inputs always draw the same cells.

use crate::dag::{self, Mode, Plan};
use crate::format;
use crate::scene::{Scene, StageRow};
use crate::status::{status_of, Shown};
use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Clear, Paragraph, Row, Table, Wrap};
use ratatui::Frame;

/// Smallest terminal the dashboard draws in; below it shows a message instead.
pub const MIN_WIDTH: u16 = 60;
/// See [`MIN_WIDTH`].
pub const MIN_HEIGHT: u16 = 10;
/// From this width on, the fork-children panel sits beside the stage table, not below it.
const WIDE: u16 = 110;
/// Width of the fork-children panel when it sits beside the table.
const SIDE_PANEL: u16 = 42;

/// What the person at the terminal has asked for: the part of the dashboard that is not the
/// run's state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ViewState {
    /// First row of the stage table shown (clamped when drawing).
    pub scroll: usize,
    /// The display is frozen on the last snapshot (the run goes on).
    pub paused: bool,
    /// The help overlay is shown.
    pub help: bool,
    /// The run has ended and the dashboard stays until `q` is pressed ([`Options::linger`](crate::Options::linger)).
    pub lingering: bool,
}

/// Draws the whole dashboard for `scene` into `frame`.
///
/// Pure: it reads nothing but its arguments, so it can be tested with ratatui's `TestBackend`.
///
/// ```
/// use minigun_hud::{draw, Scene, ViewState};
/// use ratatui::{backend::TestBackend, Terminal};
///
/// let scene = Scene {
///     pipeline: "empty".into(),
///     elapsed_secs: 0.0,
///     stages: vec![],
///     edges: vec![],
///     produced: 0,
///     rate: 0.0,
///     finished_items: 0,
///     finish_rate: 0.0,
///     total: None,
///     failures_total: 0,
///     finished: false,
///     stopping: false,
/// };
/// let mut terminal = Terminal::new(TestBackend::new(80, 24)).unwrap();
/// terminal.draw(|f| draw(f, &scene, &ViewState::default())).unwrap();
/// assert!(terminal.backend().to_string().contains("empty"));
/// ```
pub fn draw(frame: &mut Frame<'_>, scene: &Scene, state: &ViewState) {
    let area = frame.area();
    let buf = frame.buffer_mut();
    render(scene, state, area, buf);
}

/// Where each part of the dashboard goes.
pub(crate) struct Areas {
    header: Rect,
    graph: Rect,
    plan: Option<Plan>,
    table: Rect,
    panel: Option<Rect>,
    footer: Rect,
}

/// Splits `area` between the parts; `None` when it is below the minimum size.
pub(crate) fn layout(scene: &Scene, area: Rect) -> Option<Areas> {
    if area.width < MIN_WIDTH || area.height < MIN_HEIGHT {
        return None;
    }
    let [header, body, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(1),
        Constraint::Length(1),
    ])
    .areas(area);

    let forks = scene
        .stages
        .iter()
        .any(|s| s.is_fork() || !s.children.is_empty());
    let side = forks && area.width >= WIDE;
    let below = forks && !side;

    // The largest graph drawing that leaves the table (and the panel) some room.
    let inner_w = body.width.saturating_sub(2);
    let table_need = scene.stages.len() as u16 + 3;
    let children_need = children_lines(scene) as u16 + 3;
    let rest_min = table_need.min(6) + if below { children_need.min(5) } else { 0 };
    // Full boxes, else one-row boxes, else the text form; boxes only if every name fits.
    let fits = |p: &Plan| p.names_fit() && p.height() + 2 + rest_min <= body.height;
    let plan = [Mode::Full, Mode::Compact]
        .into_iter()
        .filter_map(|mode| Plan::new(scene, inner_w, mode))
        .find(fits);
    let graph_h = match &plan {
        Some(p) => p.height() + 2,
        None => (dag::list_height(scene, inner_w) + 2)
            .min(body.height.saturating_sub(rest_min))
            .max(3),
    };
    let [graph, rest] =
        Layout::vertical([Constraint::Length(graph_h), Constraint::Min(0)]).areas(body);
    let (table, panel) = if side {
        let [table, panel] =
            Layout::horizontal([Constraint::Min(0), Constraint::Length(SIDE_PANEL)]).areas(rest);
        (table, Some(panel))
    } else if below {
        let room = rest.height;
        // The table as tall as it needs (leaving the panel a few rows), the panel the rest.
        let table_h = table_need.min(room.saturating_sub(children_need.min(5)));
        let children_h = room - table_h;
        let [table, panel] =
            Layout::vertical([Constraint::Min(0), Constraint::Length(children_h)]).areas(rest);
        (table, Some(panel))
    } else {
        (rest, None)
    };
    Some(Areas {
        header,
        graph,
        plan,
        table,
        panel,
        footer,
    })
}

/// Rows of the stage table visible in a terminal of `area` (for scrolling).
pub(crate) fn table_rows(scene: &Scene, area: Rect) -> usize {
    layout(scene, area).map_or(0, |a| a.table.height.saturating_sub(3) as usize)
}

/// [`draw`] for a [`Snapshot`](minigun::Snapshot) as the monitor returns it.
pub fn draw_snapshot(frame: &mut Frame<'_>, snapshot: &minigun::Snapshot, state: &ViewState) {
    draw(frame, &Scene::from(snapshot), state);
}

/// Draws the dashboard into any buffer area (what [`draw`] does with the whole frame).
pub fn render(scene: &Scene, state: &ViewState, area: Rect, buf: &mut Buffer) {
    let Some(areas) = layout(scene, area) else {
        too_small(area, buf);
        return;
    };
    render_header(scene, state, areas.header, buf);
    render_footer(state, areas.footer, buf);
    render_graph(scene, areas.plan.as_ref(), areas.graph, buf);
    render_table(scene, state, areas.table, buf);
    if let Some(panel) = areas.panel {
        render_children(scene, panel, buf);
    }
    if state.help {
        render_help(area, buf);
    }
}

fn too_small(area: Rect, buf: &mut Buffer) {
    use ratatui::widgets::Widget;
    Clear.render(area, buf);
    let lines = vec![
        Line::from("Terminal too small").style(Style::default().add_modifier(Modifier::BOLD)),
        Line::from(format!("{}x{}", area.width, area.height)),
        Line::from(format!("need {MIN_WIDTH}x{MIN_HEIGHT}")),
        Line::from("q quits"),
    ];
    let h = (lines.len() as u16).min(area.height);
    let y = area.y + area.height.saturating_sub(h) / 2;
    let text = Paragraph::new(lines).centered().wrap(Wrap { trim: true });
    text.render(Rect::new(area.x, y, area.width, h), buf);
}

fn render_header(scene: &Scene, state: &ViewState, area: Rect, buf: &mut Buffer) {
    let full = header_line(scene, state, false);
    let line = if full.width() > area.width as usize {
        header_line(scene, state, true)
    } else {
        full
    };
    buf.set_line(area.x, area.y, &line, area.width);
}

/// The header: pipeline, state, elapsed time, items produced and their rate, progress,
/// failures; `short` drops the words for narrow terminals.
fn header_line(scene: &Scene, state: &ViewState, short: bool) -> Line<'static> {
    let badge = |text: &str, color: Color| {
        Span::styled(
            format!(" {text} "),
            Style::default()
                .fg(Color::Black)
                .bg(color)
                .add_modifier(Modifier::BOLD),
        )
    };
    let (state_text, color) = if scene.finished {
        ("FINISHED", Color::Blue)
    } else if scene.stopping {
        ("STOPPING", Color::Yellow)
    } else {
        ("RUNNING", Color::Green)
    };
    let mut spans = Vec::new();
    if !short {
        spans.push(Span::styled(
            " minigun ",
            Style::default().fg(Color::Black).bg(Color::Cyan),
        ));
    }
    spans.push(Span::styled(
        format!(" {} ", scene.pipeline),
        Style::default().add_modifier(Modifier::BOLD),
    ));
    spans.push(badge(state_text, color));
    if state.paused {
        spans.push(badge("PAUSED", Color::Magenta));
    }
    let elapsed = format::secs(scene.elapsed_secs);
    let produced = format::count(scene.produced);
    let rate = format::rate(scene.rate);
    let mut facts = if short {
        format!(" {elapsed} {produced} items {rate}")
    } else {
        format!("  elapsed {elapsed}  produced {produced} ({rate})")
    };
    if let Some((pct, eta)) = scene.progress() {
        facts.push_str(&format!("  {pct:.0}%"));
        if let (Some(eta), false) = (eta.filter(|e| *e > 0.0), scene.finished) {
            facts.push_str(&format!(" ETA {}", format::secs(eta)));
        }
    }
    spans.push(Span::raw(facts));
    spans.push(Span::raw(if short { "  failed " } else { "  failures " }));
    spans.push(Span::styled(
        format::count(scene.failures_total),
        if scene.failures_total > 0 {
            Style::default().fg(Color::Red).add_modifier(Modifier::BOLD)
        } else {
            Style::default()
        },
    ));
    Line::from(spans)
}

fn render_footer(state: &ViewState, area: Rect, buf: &mut Buffer) {
    let key = Style::default()
        .fg(Color::Cyan)
        .add_modifier(Modifier::BOLD);
    let dim = Style::default().fg(Color::DarkGray);
    let mut spans = vec![
        Span::styled(" q", key),
        Span::styled(" quit  ", dim),
        Span::styled("space", key),
        Span::styled(
            if state.paused {
                " resume  "
            } else {
                " pause  "
            },
            dim,
        ),
        Span::styled("↑↓", key),
        Span::styled(" scroll  ", dim),
        Span::styled("h", key),
        Span::styled(" help", dim),
    ];
    if state.lingering {
        spans.push(Span::styled(
            "   run ended: q closes",
            Style::default().fg(Color::Blue),
        ));
    }
    buf.set_line(area.x, area.y, &Line::from(spans), area.width);
}

fn render_graph(scene: &Scene, plan: Option<&Plan>, area: Rect, buf: &mut Buffer) {
    use ratatui::widgets::Widget;
    let block = Block::bordered().title(" graph ");
    let inner = block.inner(area);
    block.render(area, buf);
    match plan {
        Some(plan) => plan.render(scene, inner, buf),
        None => dag::render_list(scene, inner, buf),
    }
}

/// One column of the stage table.
struct Column {
    header: &'static str,
    /// Lower is kept first when the table is too narrow.
    priority: u8,
    right: bool,
    cell: fn(&StageRow) -> String,
}

const COLUMNS: &[Column] = &[
    Column {
        header: "stage",
        priority: 0,
        right: false,
        cell: |s| s.name.clone(),
    },
    Column {
        header: "kind",
        priority: 7,
        right: false,
        cell: |s| s.kind.to_string(),
    },
    Column {
        header: "executor",
        priority: 3,
        right: false,
        cell: |s| s.executor.clone(),
    },
    Column {
        header: "in",
        priority: 1,
        right: true,
        cell: |s| format::count(s.items_in),
    },
    Column {
        header: "out",
        priority: 1,
        right: true,
        cell: |s| format::count(s.items_out),
    },
    Column {
        header: "failed",
        priority: 2,
        right: true,
        cell: |s| format::count(s.failed),
    },
    Column {
        header: "rate",
        priority: 1,
        right: true,
        cell: |s| format::rate(s.throughput),
    },
    Column {
        header: "p50",
        priority: 5,
        right: true,
        cell: |s| format::micros(s.p50_us),
    },
    Column {
        header: "p99",
        priority: 4,
        right: true,
        cell: |s| format::micros(s.p99_us),
    },
    Column {
        header: "queue",
        priority: 2,
        right: true,
        cell: |s| match s.queue_capacity {
            Some(cap) => format!("{}/{cap}", s.queue_len),
            None if s.kind == minigun::StageKind::Producer => "-".to_string(),
            // Runs on its upstream's threads: it has no queue.
            None if s.chained_to.is_some() => "chained".to_string(),
            None => s.queue_len.to_string(),
        },
    },
    Column {
        header: "in flight",
        priority: 3,
        right: true,
        cell: |s| match s.in_flight_limit {
            Some(limit) => format!("{}/{limit}", format::count(s.in_flight)),
            None => "-".to_string(),
        },
    },
    Column {
        header: "status",
        priority: 0,
        right: false,
        cell: |s| status_of(s).label().to_string(),
    },
];

/// Largest scroll offset that still fills the table (`rows` visible rows).
pub(crate) fn max_scroll(stages: usize, rows: usize) -> usize {
    stages.saturating_sub(rows)
}

fn render_table(scene: &Scene, state: &ViewState, area: Rect, buf: &mut Buffer) {
    use ratatui::widgets::Widget;
    let visible = area.height.saturating_sub(3) as usize;
    let scroll = state.scroll.min(max_scroll(scene.stages.len(), visible));
    let title = if scene.stages.len() > visible && visible > 0 {
        format!(
            " stages {}-{} of {} ",
            scroll + 1,
            (scroll + visible).min(scene.stages.len()),
            scene.stages.len()
        )
    } else {
        " stages ".to_string()
    };
    let block = Block::bordered().title(title);
    let inner = block.inner(area);
    block.render(area, buf);

    // Cell texts, then the columns that fit, most important first, kept in table order.
    let texts: Vec<Vec<String>> = scene
        .stages
        .iter()
        .map(|s| COLUMNS.iter().map(|c| (c.cell)(s)).collect())
        .collect();
    let widths: Vec<u16> = COLUMNS
        .iter()
        .enumerate()
        .map(|(k, c)| {
            texts
                .iter()
                .map(|row| row[k].chars().count())
                .chain([c.header.len()])
                .max()
                .unwrap_or(0)
                .min(if k == 0 { 28 } else { 14 }) as u16
        })
        .collect();
    // The in-flight column only where a stage has a limit on it (async stages).
    let limited = scene.stages.iter().any(|s| s.in_flight_limit.is_some());
    let mut order: Vec<usize> = (0..COLUMNS.len())
        .filter(|&k| limited || COLUMNS[k].header != "in flight")
        .collect();
    order.sort_by_key(|k| COLUMNS[*k].priority);
    let mut keep = vec![false; COLUMNS.len()];
    let mut used = 0u16;
    for k in order {
        let need = widths[k] + u16::from(used > 0);
        if used + need <= inner.width {
            keep[k] = true;
            used += need;
        }
    }
    let cols: Vec<usize> = (0..COLUMNS.len()).filter(|k| keep[*k]).collect();
    let align = |k: usize, s: String| -> String {
        let w = widths[k] as usize;
        let s = format::fit(&s, w);
        if COLUMNS[k].right {
            format!("{s:>w$}")
        } else {
            s
        }
    };
    let header = Row::new(
        cols.iter()
            .map(|&k| Cell::from(align(k, COLUMNS[k].header.to_string()))),
    )
    .style(Style::default().add_modifier(Modifier::BOLD | Modifier::UNDERLINED));
    let rows = scene
        .stages
        .iter()
        .zip(texts)
        .skip(scroll)
        .take(visible)
        .map(|(st, row)| {
            let shown = status_of(st);
            Row::new(cols.iter().map(|&k| {
                let style = match COLUMNS[k].header {
                    "status" => Style::default()
                        .fg(shown.color())
                        .add_modifier(Modifier::BOLD),
                    "failed" if st.failed > 0 => Style::default().fg(Color::Red),
                    "stage" => Style::default().add_modifier(Modifier::BOLD),
                    _ => Style::default(),
                };
                Cell::from(align(k, row[k].clone())).style(style)
            }))
        });
    let table = Table::new(rows, cols.iter().map(|&k| Constraint::Length(widths[k])))
        .header(header)
        .column_spacing(1);
    table.render(inner, buf);
}

/// Lines the children panel would like: a header, then each fork stage's children (or one
/// line saying it has none).
fn children_lines(scene: &Scene) -> usize {
    scene
        .stages
        .iter()
        .filter(|s| s.is_fork() || !s.children.is_empty())
        .map(|s| s.children.len().max(1))
        .sum()
}

fn render_children(scene: &Scene, area: Rect, buf: &mut Buffer) {
    use ratatui::widgets::Widget;
    let live: usize = scene.stages.iter().map(|s| s.children.len()).sum();
    let remote = scene
        .stages
        .iter()
        .any(|s| s.children.iter().any(|c| c.host.is_some()));
    let title = match remote {
        true => format!(" fork children and remote workers ({live} live) "),
        false => format!(" fork children ({live} live) "),
    };
    let block = Block::bordered().title(title);
    let inner = block.inner(area);
    block.render(area, buf);
    let visible = inner.height.saturating_sub(1) as usize;
    let mut rows: Vec<Row<'_>> = Vec::new();
    for st in scene
        .stages
        .iter()
        .filter(|s| s.is_fork() || !s.children.is_empty())
    {
        let name = Cell::from(st.name.clone()).style(Style::default().add_modifier(Modifier::BOLD));
        if st.children.is_empty() {
            let none = Style::default().fg(Color::DarkGray);
            rows.push(Row::new(vec![
                name,
                Cell::from(Span::styled(format!("{:>7}", "-"), none)),
                Cell::from(Span::styled(format!("{:>6}", "-"), none)),
            ]));
            continue;
        }
        for (k, c) in st.children.iter().enumerate() {
            let first = if k == 0 { name.clone() } else { Cell::from("") };
            rows.push(Row::new(vec![
                first,
                Cell::from(format!("{:>7}", c.pid)),
                Cell::from(format!("{:>6}", format::count(c.items))),
                // A remote worker's memory is on its own host: show the host instead.
                Cell::from(match &c.host {
                    Some(h) => format!("{:>6}", h.chars().take(6).collect::<String>()),
                    None => format!("{:>6}", format::bytes(c.rss_bytes)),
                }),
                Cell::from(format!("{:>6}", format::secs(c.age_secs))),
            ]));
        }
    }
    if rows.len() > visible && visible > 0 {
        let hidden = rows.len() - (visible - 1);
        rows.truncate(visible - 1);
        rows.push(Row::new(vec![Cell::from(Span::styled(
            format!("… {hidden} more"),
            Style::default().fg(Color::DarkGray),
        ))]));
    }
    let header = Row::new(vec![
        Cell::from("stage"),
        Cell::from(format!("{:>7}", "pid")),
        Cell::from(format!("{:>6}", "items")),
        Cell::from(format!("{:>6}", "rss")),
        Cell::from(format!("{:>6}", "age")),
    ])
    .style(Style::default().add_modifier(Modifier::BOLD | Modifier::UNDERLINED));
    let name_w = scene
        .stages
        .iter()
        .filter(|s| s.is_fork() || !s.children.is_empty())
        .map(|s| s.name.chars().count())
        .chain([9])
        .max()
        .unwrap_or(9)
        .min(usize::from(inner.width.saturating_sub(29).max(5))) as u16;
    let table = Table::new(
        rows,
        [
            Constraint::Length(name_w),
            Constraint::Length(7),
            Constraint::Length(6),
            Constraint::Length(6),
            Constraint::Length(6),
        ],
    )
    .header(header)
    .column_spacing(1);
    table.render(inner, buf);
}

fn render_help(area: Rect, buf: &mut Buffer) {
    use ratatui::widgets::Widget;
    let key = Style::default()
        .fg(Color::Cyan)
        .add_modifier(Modifier::BOLD);
    let head = Style::default().add_modifier(Modifier::BOLD);
    let entry = |k: &'static str, what: &'static str| {
        Line::from(vec![
            Span::styled(format!("  {k:<12}"), key),
            Span::raw(what),
        ])
    };
    let status = |s: Shown, what: &'static str| {
        Line::from(vec![
            Span::styled(
                format!("  {:<12}", s.label()),
                Style::default().fg(s.color()).add_modifier(Modifier::BOLD),
            ),
            Span::raw(what),
        ])
    };
    let lines = vec![
        Line::styled("Keys", head),
        entry("q  Ctrl-C", "stop the run and quit"),
        entry("space", "pause / resume the display"),
        entry("↑ ↓", "scroll the stage table"),
        entry("PgUp PgDn", "scroll a page"),
        entry("h  ?", "show / hide this help"),
        Line::raw(""),
        Line::styled("Status", head),
        status(Shown::Active, "handled items lately, or has work"),
        status(Shown::Idle, "running, nothing to do"),
        status(Shown::Bottleneck, "busiest per worker (running)"),
        status(Shown::Error, "had failures, still running"),
        status(Shown::Done, "ended"),
        status(Shown::Waiting, "not started yet"),
    ];
    let w = 50.min(area.width);
    let h = (lines.len() as u16 + 2).min(area.height);
    let popup = Rect::new(
        area.x + (area.width - w) / 2,
        area.y + (area.height - h) / 2,
        w,
        h,
    );
    Clear.render(popup, buf);
    Paragraph::new(lines)
        .block(Block::bordered().title(" help ").border_style(key))
        .render(popup, buf);
}
