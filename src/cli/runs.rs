//! `probunet runs`: a table (or CSV) of every run and sweep trial in a folder.
use anyhow::{Context, Result};
use probunet::runs::{self, RunRow};
use std::cmp::Ordering;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct RunsArgs {
    /// The folder of runs (and sweep folders) to list.
    #[arg(default_value = "runs")]
    dir: PathBuf,
    /// The order of the rows; runs without the value come last.
    #[arg(long, value_enum, default_value_t = SortKey::Date)]
    sort: SortKey,
    /// Every field as CSV on standard output, for spreadsheets and pandas.
    #[arg(long)]
    csv: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum SortKey {
    /// Oldest first.
    Date,
    Name,
    /// Lowest best validation GED first.
    #[value(alias = "best_ged")]
    BestGed,
    /// Lowest final validation GED first.
    #[value(alias = "final_ged")]
    FinalGed,
    /// Most steps first.
    Steps,
}

pub fn run(args: RunsArgs) -> Result<()> {
    let mut rows = runs::list(&args.dir).with_context(|| {
        format!(
            "cannot list runs in {} (train one with `probunet train SPEC`)",
            args.dir.display()
        )
    })?;
    rows.sort_by(|a, b| compare(args.sort, a, b));
    if args.csv {
        let mut out = csv::Writer::from_writer(std::io::stdout());
        for row in &rows {
            out.serialize(row)?;
        }
        out.flush()?;
        return Ok(());
    }
    for line in table(&rows) {
        super::line(true, &line);
    }
    Ok(())
}

/// `None` after every value, whichever way the values sort.
fn compare(key: SortKey, a: &RunRow, b: &RunRow) -> Ordering {
    fn some_first<T: PartialOrd>(a: Option<T>, b: Option<T>) -> Ordering {
        match (a, b) {
            (Some(a), Some(b)) => a.partial_cmp(&b).unwrap_or(Ordering::Equal),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        }
    }
    let by = match key {
        SortKey::Date => some_first(a.started_at, b.started_at),
        SortKey::Name => a.name.cmp(&b.name),
        SortKey::BestGed => some_first(a.best_val_ged, b.best_val_ged),
        SortKey::FinalGed => some_first(a.final_val_ged, b.final_val_ged),
        SortKey::Steps => b.steps.cmp(&a.steps),
    };
    by.then_with(|| a.name.cmp(&b.name))
}

const HEADER: [&str; 14] = [
    "name",
    "started",
    "status",
    "steps",
    "best GED",
    "at",
    "final GED",
    "HM-IoU",
    "ELBO",
    "KL",
    "beta",
    "latent",
    "lr",
    "data",
];

/// A spec value as it is usually typed (`0.001`, `3e-4`): in scientific notation once
/// plain digits would pass 12 characters, so `lr = 1e300` is not 301 digits wide.
fn number(v: f64) -> String {
    let plain = v.to_string();
    match plain.len() <= 12 {
        true => plain,
        false => format!("{v:e}"),
    }
}

/// A measured value to `digits` decimals, in scientific notation from 1e9 on.
fn fixed(v: f64, digits: usize) -> String {
    match v.abs() < 1e9 {
        true => format!("{v:.digits$}"),
        false => format!("{v:.3e}"),
    }
}

/// The rows as aligned text, with a footnote per row that could not be read whole.
fn table(rows: &[RunRow]) -> Vec<String> {
    let f = |v: Option<f64>, digits: usize| v.map_or("-".into(), |v| fixed(v, digits));
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                r.started_at
                    .map_or("-".into(), |t| t.format("%Y-%m-%d %H:%M").to_string()),
                r.status.clone(),
                match r.total_steps {
                    Some(total) => format!("{}/{total}", r.steps),
                    None => r.steps.to_string(),
                },
                f(r.best_val_ged, 4),
                r.best_step.map_or("-".into(), |s| s.to_string()),
                f(r.final_val_ged, 4),
                f(r.final_val_hm_iou, 4),
                f(r.elbo, 1),
                f(r.kl, 3),
                r.beta.map_or("-".into(), number),
                r.latent_dim.map_or("-".into(), |d| d.to_string()),
                r.lr.map_or("-".into(), number),
                r.data.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..HEADER.len())
        .map(|i| {
            let widest = cells.iter().map(|c| c[i].chars().count()).max();
            widest.unwrap_or(0).max(HEADER[i].len())
        })
        .collect();
    let render = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        padded.join("  ").trim_end().to_string()
    };
    let header: Vec<String> = HEADER.iter().map(|h| h.to_string()).collect();
    let mut lines = vec![render(&header)];
    lines.extend(cells.iter().map(|c| render(c)));
    lines.push(format!("{} runs", rows.len()));
    for row in rows {
        if let Some(note) = &row.note {
            lines.push(format!("{}: {note}", row.name));
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_and_tiny_values_keep_their_columns_narrow() {
        assert_eq!(number(1e-3), "0.001");
        assert_eq!(number(3e-4), "0.0003");
        assert_eq!(number(1e300), "1e300");
        assert_eq!(number(2.5e-12), "2.5e-12");
        assert_eq!(number(10.0), "10");
        assert_eq!(fixed(-2744.19, 1), "-2744.2");
        assert_eq!(fixed(-3.2e30, 1), "-3.200e30");
        assert_eq!(fixed(f64::NAN, 3), "NaN");
    }
}
