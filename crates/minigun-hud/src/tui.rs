//! The live dashboard's event loop and the guard that always gives the terminal back.

use crate::logging::{flush_held, TERMINAL_OWNED};
use crate::render::{self, ViewState};
use crate::scene::{RateWindow, Scene};
use crate::Options;
use crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use crossterm::terminal::{disable_raw_mode, enable_raw_mode, Clear, ClearType};
use crossterm::terminal::{EnterAlternateScreen, LeaveAlternateScreen};
use crossterm::{cursor, execute};
use minigun::{Monitor, RunHandle};
use ratatui::backend::CrosstermBackend;
use ratatui::layout::Rect;
use ratatui::Terminal;
use std::io::{self, BufWriter, Stderr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

/// About 15 frames a second.
const FRAME: Duration = Duration::from_millis(66);
/// Rates are measured over this much time.
const RATE_WINDOW: Duration = Duration::from_secs(1);

/// Whether a dashboard is running: one at a time (others show progress lines).
static CLAIMED: AtomicBool = AtomicBool::new(false);

/// Gives the terminal back: raw mode off, main screen, cursor shown, held log lines out.
/// Safe to call any number of times, from a panic hook too.
fn restore() {
    if TERMINAL_OWNED.swap(false, Ordering::SeqCst) {
        if let Ok(mut owner) = OWNER.try_lock() {
            *owner = None;
        }
        let _ = disable_raw_mode();
        let _ = execute!(io::stderr(), LeaveAlternateScreen, cursor::Show);
        flush_held();
    }
}

/// While alive the terminal is in raw mode on the alternate screen; dropping it (also while
/// unwinding from a panic) restores the terminal.
struct TerminalGuard;

impl TerminalGuard {
    fn enter() -> io::Result<TerminalGuard> {
        if CLAIMED.swap(true, Ordering::SeqCst) {
            return Err(io::Error::other("another dashboard is on the terminal"));
        }
        install_panic_hook();
        *OWNER.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::thread::current().id());
        // From here on, an early return drops the guard, which undoes what was done.
        let guard = TerminalGuard;
        enable_raw_mode()?;
        TERMINAL_OWNED.store(true, Ordering::SeqCst);
        execute!(
            io::stderr(),
            EnterAlternateScreen,
            cursor::Hide,
            Clear(ClearType::All)
        )?;
        Ok(guard)
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore();
        CLAIMED.store(false, Ordering::SeqCst);
    }
}

/// The thread that draws the dashboard (set while it owns the terminal).
static OWNER: Mutex<Option<ThreadId>> = Mutex::new(None);

/// A panic on the dashboard's thread restores the terminal before the panic message is
/// printed (otherwise it would be printed on the alternate screen, in raw mode, and lost).
/// Panics on other threads leave the terminal to the dashboard: a stage's panic is caught and
/// recorded as a failure by the run (whose own hook keeps its message quiet).
fn install_panic_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let owner = OWNER.try_lock().ok().and_then(|o| *o);
            if owner == Some(std::thread::current().id()) {
                restore();
            }
            previous(info);
        }));
    });
}

/// How the dashboard ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The run ended.
    Finished,
    /// The person quit; the run was asked to stop.
    Quit,
}

/// What a key asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    /// Stop the run and leave.
    Quit,
    /// Leave (the run has already ended).
    Close,
    /// Redraw now.
    Redraw,
    /// Nothing.
    Ignore,
}

/// Applies one key to the view state. `rows` is the number of visible table rows.
pub(crate) fn on_key(state: &mut ViewState, key: KeyEvent, stages: usize, rows: usize) -> Flow {
    if key.kind == KeyEventKind::Release {
        return Flow::Ignore;
    }
    let ctrl_c = key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c');
    if ctrl_c || key.code == KeyCode::Char('q') || key.code == KeyCode::Char('Q') {
        return if state.lingering {
            Flow::Close
        } else {
            Flow::Quit
        };
    }
    let max = render::max_scroll(stages, rows);
    let page = rows.max(1);
    match key.code {
        KeyCode::Esc if state.help => state.help = false,
        KeyCode::Esc | KeyCode::Enter if state.lingering => return Flow::Close,
        KeyCode::Char('h') | KeyCode::Char('H') | KeyCode::Char('?') => state.help = !state.help,
        KeyCode::Char(' ') => state.paused = !state.paused,
        KeyCode::Up => state.scroll = state.scroll.min(max).saturating_sub(1),
        KeyCode::Down => state.scroll = (state.scroll + 1).min(max),
        KeyCode::PageUp => state.scroll = state.scroll.min(max).saturating_sub(page),
        KeyCode::PageDown => state.scroll = (state.scroll + page).min(max),
        KeyCode::Home => state.scroll = 0,
        KeyCode::End => state.scroll = max,
        _ => return Flow::Ignore,
    }
    Flow::Redraw
}

/// Takes the terminal, shows the dashboard until the run ends (or the person quits, which
/// stops the run), and gives the terminal back.
pub(crate) fn run(handle: &RunHandle, monitor: &Monitor, options: &Options) -> io::Result<Outcome> {
    let guard = TerminalGuard::enter()?;
    let outcome = event_loop(handle, monitor, options);
    drop(guard);
    outcome
}

fn event_loop(handle: &RunHandle, monitor: &Monitor, options: &Options) -> io::Result<Outcome> {
    let backend = CrosstermBackend::new(BufWriter::new(io::stderr()));
    // No Terminal::clear(): it asks the terminal for the cursor position on stdout, which may
    // not be a terminal (the screen was cleared when it was taken).
    let mut terminal: Terminal<CrosstermBackend<BufWriter<Stderr>>> = Terminal::new(backend)?;
    let mut state = ViewState::default();
    let mut rates = RateWindow::new(RATE_WINDOW);
    // A snapshot's elapsed time goes on growing after the run ends: keep the first one.
    let mut ended_at = None;
    let mut take = |rates: &mut RateWindow| {
        let mut scene = Scene::from(&monitor.snapshot());
        scene.total = options.total.or(scene.total);
        rates.apply(&mut scene, Instant::now());
        if scene.finished {
            scene.elapsed_secs = *ended_at.get_or_insert(scene.elapsed_secs);
        }
        scene
    };
    let mut scene = take(&mut rates);
    let mut next = Instant::now();
    loop {
        let finished = handle.is_finished();
        if !state.paused || finished {
            scene = take(&mut rates);
        }
        if finished {
            if !options.linger {
                return Ok(Outcome::Finished);
            }
            state.lingering = true;
            state.paused = false;
        }
        terminal.draw(|f| render::draw(f, &scene, &state))?;
        next += FRAME;
        let now = Instant::now();
        if next < now {
            next = now + FRAME;
        }
        // Wait for keys until the next frame is due.
        loop {
            let wait = next.saturating_duration_since(Instant::now());
            if wait.is_zero() || !event::poll(wait)? {
                break;
            }
            match event::read()? {
                Event::Key(key) => {
                    let size = terminal.size()?;
                    let rows = render::table_rows(&scene, Rect::new(0, 0, size.width, size.height));
                    match on_key(&mut state, key, scene.stages.len(), rows) {
                        Flow::Quit => {
                            handle.stop();
                            return Ok(Outcome::Quit);
                        }
                        Flow::Close => return Ok(Outcome::Finished),
                        Flow::Redraw => {
                            terminal.draw(|f| render::draw(f, &scene, &state))?;
                        }
                        Flow::Ignore => {}
                    }
                }
                Event::Resize(..) => {
                    terminal.autoresize()?;
                    terminal.draw(|f| render::draw(f, &scene, &state))?;
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    #[test]
    fn keys_change_the_view_state() {
        let mut s = ViewState::default();
        assert_eq!(on_key(&mut s, key(KeyCode::Char(' ')), 10, 4), Flow::Redraw);
        assert!(s.paused);
        on_key(&mut s, key(KeyCode::Char('h')), 10, 4);
        assert!(s.help);
        on_key(&mut s, key(KeyCode::Esc), 10, 4);
        assert!(!s.help);
        for _ in 0..20 {
            on_key(&mut s, key(KeyCode::Down), 10, 4);
        }
        assert_eq!(s.scroll, 6, "scrolls no further than the last full page");
        on_key(&mut s, key(KeyCode::Up), 10, 4);
        assert_eq!(s.scroll, 5);
        on_key(&mut s, key(KeyCode::Home), 10, 4);
        assert_eq!(s.scroll, 0);
        on_key(&mut s, key(KeyCode::End), 10, 4);
        assert_eq!(s.scroll, 6);
        assert_eq!(on_key(&mut s, key(KeyCode::Char('x')), 10, 4), Flow::Ignore);
        assert_eq!(on_key(&mut s, key(KeyCode::Char('q')), 10, 4), Flow::Quit);
        let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
        assert_eq!(on_key(&mut s, ctrl_c, 10, 4), Flow::Quit);
        s.lingering = true;
        assert_eq!(on_key(&mut s, key(KeyCode::Char('q')), 10, 4), Flow::Close);
    }
}
