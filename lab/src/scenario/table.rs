//! The result [`Table`] of the scenario tests: one row per cell of a
//! matrix, rendered as Markdown-like text, printed and written under
//! `target/` so a run leaves its table behind.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

/// One row of a [`Table`].
#[derive(Debug, Clone)]
pub struct Row {
    /// The cells, the last one being the result.
    pub cells: Vec<String>,
    /// Whether the row passed.
    pub ok: bool,
}

/// A result table rendered as Markdown-like text: every column padded but
/// the last (the result).
#[derive(Debug, Clone)]
pub struct Table {
    columns: Vec<String>,
    /// The rows so far.
    pub rows: Vec<Row>,
}

impl Table {
    /// An empty table with these column names (the last is the result).
    pub fn new(columns: &[&str]) -> Table {
        Table {
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row: `lead` (every column but the result), then `result`.
    pub fn push(&mut self, lead: &[&str], result: String, ok: bool) {
        let mut cells: Vec<String> = lead.iter().map(|c| c.to_string()).collect();
        cells.push(result);
        self.rows.push(Row { cells, ok });
    }

    /// Adds a row that passes when `got` names the host `expect` (as
    /// `expect` or `hello from expect`).
    pub fn check(&mut self, lead: &[&str], expect: &str, got: Result<String>) {
        let (result, ok) = match got {
            Ok(who) if who.strip_prefix("hello from ").unwrap_or(&who) == expect => {
                (format!("ok ({who})"), true)
            }
            Ok(who) => (format!("WRONG HOST: {who}, expected {expect}"), false),
            Err(e) => (format!("FAIL: {e:#}"), false),
        };
        self.push(lead, result, ok);
    }

    /// Adds a row that passes when `got` is `Ok`, showing its text.
    pub fn note(&mut self, lead: &[&str], got: Result<String>) {
        let (result, ok) = match got {
            Ok(s) => (format!("ok ({s})"), true),
            Err(e) => (format!("FAIL: {e:#}"), false),
        };
        self.push(lead, result, ok);
    }

    /// How many rows passed.
    pub fn passed(&self) -> usize {
        self.rows.iter().filter(|r| r.ok).count()
    }

    /// The first cell of every failed row.
    pub fn failed(&self) -> Vec<&str> {
        self.rows
            .iter()
            .filter(|r| !r.ok)
            .map(|r| r.cells.first().map(String::as_str).unwrap_or(""))
            .collect()
    }

    /// The table as text.
    pub fn render(&self) -> String {
        let lead = self.columns.len().saturating_sub(1);
        let widths: Vec<usize> = (0..lead)
            .map(|i| {
                self.rows
                    .iter()
                    .map(|r| r.cells.get(i).map_or(0, String::len))
                    .max()
                    .unwrap_or(4)
                    .max(4)
                    .max(self.columns[i].len())
            })
            .collect();
        let mut out = String::new();
        let last = self.columns.last().map(String::as_str).unwrap_or("");
        for (name, w) in self.columns.iter().zip(&widths) {
            let _ = write!(out, "| {name:w$} ");
        }
        let _ = writeln!(out, "| {last}");
        for w in &widths {
            let _ = write!(out, "|{}", "-".repeat(w + 2));
        }
        out += "|--------\n";
        for r in &self.rows {
            for (c, w) in r.cells.iter().zip(&widths) {
                let _ = write!(out, "| {c:w$} ");
            }
            let _ = writeln!(out, "| {}", r.cells.get(lead).map_or("", String::as_str));
        }
        out
    }

    /// Publishes the table with a footer counting the passed cells and
    /// the time since `started`, and fails naming the failed cells.
    pub fn conclude(&self, file: &str, started: std::time::Instant) -> anyhow::Result<()> {
        let footer = format!(
            "{}/{} passed, total {:?}",
            self.passed(),
            self.rows.len(),
            started.elapsed()
        );
        let out = self.publish(file, &footer);
        anyhow::ensure!(
            self.failed().is_empty(),
            "failed: {:?}\n{out}",
            self.failed()
        );
        Ok(())
    }

    /// Renders the table followed by `footer`, prints it, writes it to
    /// `target/<file>` of the workspace (best effort) and returns it.
    pub fn publish(&self, file: &str, footer: &str) -> String {
        let summary = format!("{}\n{footer}\n", self.render());
        println!("\n{summary}");
        let out = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target")
            .join(file);
        let _ = std::fs::write(out, &summary);
        summary
    }
}
