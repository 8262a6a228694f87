//! The sensitive-data classifier on its committed corpus (`tests/corpus/sensitive.tsv`, written by
//! `generate_sensitive.py`): positive samples per type and look-alikes that are not sensitive
//! (Luhn-invalid card numbers, invalid SSNs, IBANs with a wrong check, order numbers, versions,
//! UUIDs, hashes, almost-emails …). Prints precision and recall per type and in all; the goal is
//! ≥ 0.98 for both.

use std::collections::BTreeMap;

use eastguard_apisec::sensitive::builtin;

#[test]
fn corpus_precision_and_recall() {
    let text = include_str!("corpus/sensitive.tsv");
    // type → (true positives, false positives, false negatives)
    let mut per: BTreeMap<String, (u32, u32, u32)> = BTreeMap::new();
    let mut misses = Vec::new();
    for line in text.lines() {
        let (want, value) = line.split_once('\t').expect("type<TAB>value");
        let value = value.replace("\\n", "\n");
        let got: Vec<String> = builtin(&value)
            .iter()
            .map(|t| t.name().to_owned())
            .collect();
        let got = got.first().cloned().unwrap_or_else(|| "none".into());
        if got == want {
            if want != "none" {
                per.entry(want.into()).or_default().0 += 1;
            }
        } else {
            misses.push(format!("{want} read as {got}: {value:?}"));
            if got != "none" {
                per.entry(got).or_default().1 += 1;
            }
            if want != "none" {
                per.entry(want.into()).or_default().2 += 1;
            }
        }
    }
    let (mut tp, mut fp, mut fn_) = (0, 0, 0);
    for (t, (p, f, n)) in &per {
        println!(
            "{t:<16} precision {:.3} recall {:.3} ({p} found, {f} wrong, {n} missed)",
            f64::from(*p) / f64::from((p + f).max(1)),
            f64::from(*p) / f64::from((p + n).max(1))
        );
        tp += p;
        fp += f;
        fn_ += n;
    }
    let precision = f64::from(tp) / f64::from((tp + fp).max(1));
    let recall = f64::from(tp) / f64::from((tp + fn_).max(1));
    println!(
        "all: precision {precision:.3} recall {recall:.3} over {} samples",
        text.lines().count()
    );
    for m in &misses {
        println!("  {m}");
    }
    assert!(
        precision >= 0.98 && recall >= 0.98,
        "precision {precision:.3}, recall {recall:.3}: {misses:#?}"
    );
    assert!(tp > 400, "the corpus is read ({tp} true positives)");
}
