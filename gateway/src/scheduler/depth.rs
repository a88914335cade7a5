//! How many steps the scheduler keeps in flight: one per stage at least, so that every stage can
//! compute at once, and more where the hops between the stages take long enough that the stages
//! would otherwise wait for steps in transit (workers on other hosts).
//!
//! Each completed step says how long its round trip took (the gateway measures it) and how long
//! the stages held it and computed on it (each stage adds its own, [`StageTimes`]). What the
//! stages did not hold it, it spent on the hops. With `k` steps in flight over `s` stages of
//! equal weight, a stage is busy `k · c` of every round trip `s · c + h`, where `c` is a stage's
//! computation on one step and `h` the hops' time: it never waits once `k ≥ s + h / c`. More
//! steps than that only make each smaller, and each step reads every weight of a stage again.
//! So the count is `s + e` with `e` near `h / c` (from moving averages of `h` and `c`), within
//! `[s, max]`. It moves one step at a time, at most once per [`WINDOW`] completions (so that a
//! change is measured before the next), and only when `h / c` is past `e` by more than
//! [`HYSTERESIS`]: where `h / c` sits near a half, a count that followed its rounding would go
//! back and forth with every window (on 2 ms hops between two stages on one host, `h / c` read
//! 1.4 to 1.7 step after step).

use std::time::Duration;

use strata_shared::wire::StageTimes;

/// Completions between two changes of the count.
pub const WINDOW: u32 = 16;

/// How far past the steps beyond one per stage `h / c` must be for the count to move.
pub const HYSTERESIS: f64 = 0.65;

/// Weight of each new step in the moving averages.
const ALPHA: f64 = 1.0 / 8.0;

/// The steps in flight: fixed, or adapted to the hops' time.
#[derive(Debug, Clone)]
pub struct StepsInFlight {
    /// The stages, and the fewest steps in flight: one per stage.
    stages: usize,
    max: usize,
    current: usize,
    /// Moving averages, in seconds: a step's time on the hops, and one stage's computation on
    /// it (`None` before the first step measured).
    hops: Option<f64>,
    stage: f64,
    /// Completions measured since the count last changed (or could have).
    since: u32,
}

/// A change of the count, with the averages that made it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Change {
    pub from: usize,
    pub to: usize,
    /// A step's time on the hops, and one stage's computation on it.
    pub hops: Duration,
    pub stage: Duration,
}

impl StepsInFlight {
    /// Always `n` (an operator's `--steps-in-flight`, or a pipeline that cannot measure).
    pub fn fixed(n: usize) -> Self {
        let n = n.max(1);
        StepsInFlight {
            stages: n,
            max: n,
            current: n,
            hops: None,
            stage: 0.0,
            since: 0,
        }
    }

    /// One per stage of `stages`, and up to `max` where the hops call for more.
    pub fn adaptive(stages: usize, max: usize) -> Self {
        let stages = stages.max(1);
        StepsInFlight {
            max: max.max(stages),
            ..Self::fixed(stages)
        }
    }

    /// Steps to keep in flight now.
    pub fn current(&self) -> usize {
        self.current
    }

    /// Whether the count can change.
    pub fn adapts(&self) -> bool {
        self.max > self.stages
    }

    /// A step came back `round_trip` after it left, having been held `times` by the stages.
    /// Returns the change this made to the count, if any. Steps that computed nothing (only
    /// releases) say nothing of the stages' pace and are left out.
    pub fn observe(&mut self, round_trip: Duration, times: StageTimes) -> Option<Change> {
        if !self.adapts() || times.compute_us == 0 {
            return None;
        }
        let secs = |us: u64| us as f64 / 1e6;
        let hops = (round_trip.as_secs_f64() - secs(times.held_us)).max(0.0);
        let stage = secs(times.compute_us) / self.stages as f64;
        match self.hops {
            None => {
                self.hops = Some(hops);
                self.stage = stage;
            }
            Some(h) => {
                self.hops = Some(h + ALPHA * (hops - h));
                self.stage += ALPHA * (stage - self.stage);
            }
        }
        self.since += 1;
        if self.since < WINDOW {
            return None;
        }
        self.since = 0;
        let hops = self.hops.unwrap_or(0.0);
        if self.stage <= 0.0 {
            return None;
        }
        let wanted = hops / self.stage;
        let extra = (self.current - self.stages) as f64;
        let to = if wanted >= extra + HYSTERESIS && self.current < self.max {
            self.current + 1
        } else if wanted <= extra - HYSTERESIS && self.current > self.stages {
            self.current - 1
        } else {
            return None;
        };
        let change = Change {
            from: self.current,
            to,
            hops: Duration::from_secs_f64(hops),
            stage: Duration::from_secs_f64(self.stage),
        };
        self.current = to;
        Some(change)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: f64) -> Duration {
        Duration::from_secs_f64(v / 1e3)
    }

    /// `n` steps over `stages` stages, each computing `stage_ms` on a step, the stages holding
    /// it `held_ms` in all, its round trip `held_ms + hops_ms`.
    fn feed(
        d: &mut StepsInFlight,
        n: u32,
        stages: usize,
        stage_ms: f64,
        held_ms: f64,
        hops_ms: f64,
    ) -> Vec<Change> {
        let times = StageTimes {
            held_us: (held_ms * 1e3) as u64,
            compute_us: (stage_ms * stages as f64 * 1e3) as u64,
        };
        (0..n)
            .filter_map(|_| d.observe(ms(held_ms + hops_ms), times))
            .collect()
    }

    #[test]
    fn hops_that_take_next_to_nothing_keep_one_step_per_stage() {
        let mut d = StepsInFlight::adaptive(2, 6);
        // Two stages of 6 ms, a step waiting 6 ms behind the other one, 0.5 ms on the hops.
        assert!(feed(&mut d, 200, 2, 6.0, 18.0, 0.5).is_empty());
        assert_eq!(d.current(), 2);
    }

    #[test]
    fn hops_as_long_as_a_stage_s_step_add_one_step_and_no_more() {
        let mut d = StepsInFlight::adaptive(2, 6);
        let changes = feed(&mut d, 200, 2, 6.4, 12.8, 6.0);
        assert_eq!(d.current(), 3);
        assert_eq!(changes.len(), 1);
        let c = changes[0];
        assert_eq!((c.from, c.to), (2, 3));
        assert!((c.hops.as_secs_f64() * 1e3 - 6.0).abs() < 0.01, "{c:?}");
        assert!((c.stage.as_secs_f64() * 1e3 - 6.4).abs() < 0.01, "{c:?}");
        // The smaller steps of three in flight (4.9 ms a stage) still call for three.
        assert!(feed(&mut d, 200, 2, 4.9, 9.8, 6.0).is_empty());
        assert_eq!(d.current(), 3);
    }

    #[test]
    fn the_count_moves_a_step_per_window_and_stops_at_its_bound() {
        let mut d = StepsInFlight::adaptive(2, 4);
        // Hops ten times a stage's step: the target is 12, bounded by 4.
        assert!(feed(&mut d, WINDOW - 1, 2, 2.0, 4.0, 20.0).is_empty());
        assert_eq!(feed(&mut d, 1, 2, 2.0, 4.0, 20.0).len(), 1);
        assert_eq!(d.current(), 3);
        assert_eq!(feed(&mut d, WINDOW, 2, 2.0, 4.0, 20.0).len(), 1);
        assert_eq!(d.current(), 4);
        assert!(feed(&mut d, 10 * WINDOW, 2, 2.0, 4.0, 20.0).is_empty());
        assert_eq!(d.current(), 4);
        // The hops get fast again: back to one step per stage, a step per window.
        let back = feed(&mut d, 20 * WINDOW, 2, 2.0, 4.0, 0.1);
        assert_eq!(
            back.iter().map(|c| (c.from, c.to)).collect::<Vec<_>>(),
            vec![(4, 3), (3, 2)]
        );
    }

    #[test]
    fn a_fixed_count_never_moves_and_release_only_steps_say_nothing() {
        let mut d = StepsInFlight::fixed(3);
        assert!(feed(&mut d, 200, 3, 2.0, 6.0, 50.0).is_empty());
        assert_eq!(d.current(), 3);
        let mut d = StepsInFlight::adaptive(2, 6);
        let nothing = StageTimes {
            held_us: 10,
            compute_us: 0,
        };
        for _ in 0..200 {
            assert_eq!(d.observe(ms(30.0), nothing), None);
        }
        assert_eq!(d.current(), 2);
    }

    #[test]
    fn hops_near_a_half_of_a_stage_s_step_do_not_move_the_count_back_and_forth() {
        let mut d = StepsInFlight::adaptive(2, 6);
        assert_eq!(feed(&mut d, WINDOW, 2, 6.0, 12.0, 9.0).len(), 1);
        assert_eq!(d.current(), 3);
        // `h / c` from 1.43 to 1.55, window after window: three steps stay.
        for stage_ms in [6.3, 5.8, 6.2, 5.9, 6.3, 5.8] {
            assert!(feed(&mut d, WINDOW, 2, stage_ms, 2.0 * stage_ms, 9.0).is_empty());
        }
        assert_eq!(d.current(), 3);
    }

    #[test]
    fn a_single_slow_step_does_not_move_the_count() {
        let mut d = StepsInFlight::adaptive(2, 6);
        assert!(feed(&mut d, 5, 2, 6.0, 12.0, 0.5).is_empty());
        // One step stuck 30 ms on a hop, then the usual pace.
        assert!(feed(&mut d, 1, 2, 6.0, 12.0, 30.0).is_empty());
        assert!(feed(&mut d, 200, 2, 6.0, 12.0, 0.5).is_empty());
        assert_eq!(d.current(), 2);
    }
}
