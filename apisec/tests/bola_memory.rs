//! The BOLA detector's memory under 10,000 callers × 100 operations, each asking for a few
//! objects: at most `max_keys` states are kept, whatever arrives, and their size is the
//! documented bound.

use eastguard_apisec::bola::{Detector, Limits};

#[test]
fn ten_thousand_callers_times_a_hundred_operations_stay_bounded() {
    let limits = Limits::default();
    let mut d: Detector<(u32, u32)> = Detector::new(limits);
    let info = allocation_counter::measure(|| {
        for caller in 0..10_000u32 {
            for op in 0..100u32 {
                for id in ["17", "4711", "abc-9"] {
                    d.observe((caller, op), id, 200, 1);
                }
            }
        }
    });
    let mib = info.bytes_max as f64 / (1024.0 * 1024.0);
    println!(
        "10,000 callers × 100 operations: {} states kept (max_keys {}), {} untracked calls, peak {mib:.1} MiB",
        d.tracked(),
        limits.max_keys,
        d.untracked
    );
    assert_eq!(d.tracked(), limits.max_keys);
    assert_eq!(d.untracked, 3 * (1_000_000 - limits.max_keys as u64));
    // The README's bound: about 1.5 KiB per state.
    assert!(mib < 16.0, "{mib:.1} MiB");
}
