//! The seeded, patient-level split. Slices of one patient are near-duplicates, so a split
//! by slice would leak the test set into training; every patient goes to exactly one part.
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_pcg::Pcg64;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// One part of the split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SplitName {
    Train,
    Val,
    Test,
}

impl SplitName {
    pub const ALL: [SplitName; 3] = [SplitName::Train, SplitName::Val, SplitName::Test];
}

impl fmt::Display for SplitName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SplitName::Train => "train",
            SplitName::Val => "val",
            SplitName::Test => "test",
        })
    }
}

impl FromStr for SplitName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "train" => Ok(SplitName::Train),
            "val" | "validation" => Ok(SplitName::Val),
            "test" => Ok(SplitName::Test),
            _ => Err(format!("unknown split {s:?}: expected train, val or test")),
        }
    }
}

/// Percentages of patients per part, e.g. `80,10,10`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitFractions {
    pub train: u32,
    pub val: u32,
    pub test: u32,
}

impl Default for SplitFractions {
    fn default() -> Self {
        Self {
            train: 80,
            val: 10,
            test: 10,
        }
    }
}

impl FromStr for SplitFractions {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<u32> = s
            .split(',')
            .map(|p| p.trim().parse::<u32>())
            .collect::<Result<_, _>>()
            .map_err(|_| {
                format!("split {s:?}: expected three whole percentages such as 80,10,10")
            })?;
        match parts[..] {
            [train, val, test] if train + val + test == 100 && train > 0 => {
                Ok(Self { train, val, test })
            }
            [_, _, _] => Err(format!(
                "split {s:?}: the percentages must sum to 100 with train > 0"
            )),
            _ => Err(format!(
                "split {s:?}: expected three percentages (train,val,test)"
            )),
        }
    }
}

impl fmt::Display for SplitFractions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{},{}", self.train, self.val, self.test)
    }
}

/// Item indices per part, each sorted, with what made them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Split {
    pub seed: u64,
    pub fractions: SplitFractions,
    pub train: Vec<usize>,
    pub val: Vec<usize>,
    pub test: Vec<usize>,
}

impl Split {
    /// Assigns whole patients to parts: the distinct patients (sorted, so the input order
    /// does not matter) are shuffled with `seed` and cut by the percentages; a part with a
    /// non-zero percentage gets at least one patient when there are enough.
    pub fn by_patient(patients: &[String], fractions: SplitFractions, seed: u64) -> Split {
        let mut items_of: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, p) in patients.iter().enumerate() {
            items_of.entry(p.as_str()).or_default().push(i);
        }
        let mut order: Vec<&str> = items_of.keys().copied().collect();
        order.shuffle(&mut Pcg64::seed_from_u64(seed));

        let total = order.len();
        let share = |pct: u32| {
            let n = (total as f64 * pct as f64 / 100.0).round() as usize;
            if pct > 0 && total >= 3 {
                n.max(1)
            } else {
                n
            }
        };
        let n_val = share(fractions.val).min(total);
        let n_test = share(fractions.test).min(total - n_val);
        let (val, rest) = order.split_at(n_val);
        let (test, train) = rest.split_at(n_test);
        let gather = |part: &[&str]| {
            let mut idx: Vec<usize> = part
                .iter()
                .flat_map(|p| items_of[p].iter().copied())
                .collect();
            idx.sort_unstable();
            idx
        };
        Split {
            seed,
            fractions,
            train: gather(train),
            val: gather(val),
            test: gather(test),
        }
    }

    pub fn indices(&self, part: SplitName) -> &[usize] {
        match part {
            SplitName::Train => &self.train,
            SplitName::Val => &self.val,
            SplitName::Test => &self.test,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn patients() -> Vec<String> {
        // 40 patients with 1 to 7 slices each, interleaved as a merged file may be.
        let mut out = Vec::new();
        for round in 0..7 {
            for p in 0..40 {
                if p % 7 >= round {
                    out.push(format!("LIDC-IDRI-{p:04}"));
                }
            }
        }
        out
    }

    #[test]
    fn slices_of_one_patient_never_cross_parts() {
        let patients = patients();
        for seed in 0..20 {
            let split = Split::by_patient(&patients, SplitFractions::default(), seed);
            let mut part_of = std::collections::HashMap::new();
            let mut seen = HashSet::new();
            for part in SplitName::ALL {
                for &i in split.indices(part) {
                    assert!(seen.insert(i), "item {i} in two parts");
                    let previous = part_of.insert(patients[i].clone(), part);
                    assert!(
                        previous.is_none_or(|p| p == part),
                        "{} crosses parts",
                        patients[i]
                    );
                }
            }
            assert_eq!(seen.len(), patients.len(), "every item is in a part");
        }
    }

    #[test]
    fn parts_follow_the_percentages_by_patient_and_the_seed() {
        let patients = patients();
        let split = Split::by_patient(&patients, SplitFractions::default(), 7);
        let count = |part| {
            split
                .indices(part)
                .iter()
                .map(|&i| &patients[i])
                .collect::<HashSet<_>>()
                .len()
        };
        assert_eq!(
            (
                count(SplitName::Train),
                count(SplitName::Val),
                count(SplitName::Test)
            ),
            (32, 4, 4)
        );
        assert_eq!(
            split,
            Split::by_patient(&patients, SplitFractions::default(), 7)
        );
        assert_ne!(
            split,
            Split::by_patient(&patients, SplitFractions::default(), 8)
        );
        let mut reversed = patients.clone();
        reversed.reverse();
        let other = Split::by_patient(&reversed, SplitFractions::default(), 7);
        let names =
            |s: &Split, p: &[String]| s.val.iter().map(|&i| p[i].clone()).collect::<HashSet<_>>();
        assert_eq!(
            names(&split, &patients),
            names(&other, &reversed),
            "input order does not matter"
        );
    }

    #[test]
    fn fractions_parse_and_refuse_bad_values() {
        assert_eq!(
            "70, 15,15".parse::<SplitFractions>().unwrap(),
            SplitFractions {
                train: 70,
                val: 15,
                test: 15
            }
        );
        assert_eq!("100,0,0".parse::<SplitFractions>().unwrap().val, 0);
        for bad in ["80,10", "80,10,5", "0,50,50", "a,b,c", "80,10,10,0"] {
            let err = bad.parse::<SplitFractions>().unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn few_patients_still_fill_every_asked_part() {
        let patients: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let split = Split::by_patient(&patients, SplitFractions::default(), 1);
        assert_eq!(
            (split.train.len(), split.val.len(), split.test.len()),
            (1, 1, 1)
        );
    }
}
