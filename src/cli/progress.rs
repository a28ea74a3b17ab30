//! Progress display. On a terminal: a spinner naming the stage, and a bar with s/it while sampling.
//! Anywhere else (pipes, logs, CI): nothing; the caller prints one summary line at the end.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sdcap::pipeline::Event;

pub struct Progress {
    enabled: bool,
    current: Option<Display>,
    stage_started: Instant,
}

enum Display {
    Spinner(ProgressBar),
    Steps(ProgressBar),
}

impl Progress {
    pub fn new(enabled: bool) -> Self {
        Progress {
            enabled,
            current: None,
            stage_started: Instant::now(),
        }
    }

    pub fn on_event(&mut self, event: Event) {
        if let Event::Notice(message) = &event {
            // Said once by the pipeline, and worth seeing even in a log.
            match &self.current {
                Some(Display::Spinner(bar) | Display::Steps(bar)) => {
                    bar.println(format!("sdcap: {message}"))
                }
                None => eprintln!("sdcap: {message}"),
            }
            return;
        }
        if !self.enabled {
            return;
        }
        match event {
            Event::Planned(_) | Event::Notice(_) => {}
            Event::Stage(name) => {
                self.close();
                self.stage_started = Instant::now();
                let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
                bar.set_style(
                    ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                        .expect("valid template"),
                );
                bar.set_message(name);
                bar.enable_steady_tick(Duration::from_millis(120));
                self.current = Some(Display::Spinner(bar));
            }
            Event::Step { index, total } => {
                if !matches!(self.current, Some(Display::Steps(_))) {
                    self.close();
                    let bar = ProgressBar::with_draw_target(
                        Some(total as u64),
                        ProgressDrawTarget::stderr(),
                    );
                    bar.set_style(
                        ProgressStyle::with_template("sampling [{bar:30}] {pos}/{len} {msg}")
                            .expect("valid template")
                            .progress_chars("=> "),
                    );
                    self.current = Some(Display::Steps(bar));
                }
                let Some(Display::Steps(bar)) = &self.current else {
                    return;
                };
                // Average since the stage began: exact for uniform steps, and unlike a windowed rate
                // it is not thrown off by the bar being created after the first step.
                let s_per_it = self.stage_started.elapsed().as_secs_f64() / index.max(1) as f64;
                let eta = s_per_it * total.saturating_sub(index) as f64;
                bar.set_position(index as u64);
                bar.set_message(format!("{s_per_it:.2} s/it, eta {eta:.0} s"));
            }
        }
    }

    /// Takes the display off the terminal: a finished step bar stays (it shows the final s/it), a
    /// spinner goes.
    fn close(&mut self) {
        match self.current.take() {
            Some(Display::Spinner(bar)) => bar.finish_and_clear(),
            Some(Display::Steps(bar)) => {
                if bar.position() >= bar.length().unwrap_or(0) {
                    bar.finish();
                } else {
                    bar.abandon();
                }
            }
            None => {}
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Any event order the pipeline might produce is displayed without panicking (on a terminal
    /// when the tests run in one; hidden otherwise).
    #[test]
    fn tolerates_any_event_order() {
        for enabled in [false, true] {
            let mut p = Progress::new(enabled);
            p.on_event(Event::Step { index: 0, total: 0 });
            p.on_event(Event::Stage("load"));
            p.on_event(Event::Stage("encode"));
            p.on_event(Event::Stage("denoise"));
            for index in 1..=3 {
                p.on_event(Event::Step { index, total: 3 });
            }
            p.on_event(Event::Stage("decode"));
            p.on_event(Event::Step { index: 1, total: 2 });
        }
    }
}
