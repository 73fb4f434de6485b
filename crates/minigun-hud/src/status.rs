//! How a stage's status is shown (label and colour), shared by the table and the graph.

use crate::scene::StageRow;
use minigun::StageStatus;
use ratatui::style::Color;

/// The status a stage is shown with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shown {
    Waiting,
    Active,
    Idle,
    Bottleneck,
    Error,
    Done,
}

impl Shown {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Shown::Waiting => "waiting",
            Shown::Active => "active",
            Shown::Idle => "idle",
            Shown::Bottleneck => "bottleneck",
            Shown::Error => "error",
            Shown::Done => "done",
        }
    }

    pub(crate) fn color(self) -> Color {
        match self {
            Shown::Waiting => Color::DarkGray,
            Shown::Active => Color::Green,
            Shown::Idle => Color::Gray,
            Shown::Bottleneck => Color::Yellow,
            Shown::Error => Color::Red,
            Shown::Done => Color::Blue,
        }
    }
}

/// A stage's shown status: the bottleneck mark only while the stage runs (active or idle).
pub(crate) fn status_of(st: &StageRow) -> Shown {
    match st.status {
        StageStatus::Done => Shown::Done,
        StageStatus::Error => Shown::Error,
        StageStatus::Waiting => Shown::Waiting,
        StageStatus::Active | StageStatus::Idle if st.bottleneck => Shown::Bottleneck,
        StageStatus::Active => Shown::Active,
        StageStatus::Idle => Shown::Idle,
        // A status added to the library later: show the stage as running.
        _ => Shown::Active,
    }
}
