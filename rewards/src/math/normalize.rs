//! Normalising an extracted answer before parsing: LaTeX spacing and sizing commands, `\text{}`,
//! degrees, percent, currency and unit words, thousands separators, mixed numbers.

use std::sync::OnceLock;

use regex::Regex;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalized {
    pub text: String,
    /// The answer carried a percent sign (`50\%`): compare as 50 and as 0.5.
    pub percent: bool,
}

fn re(cell: &'static OnceLock<Regex>, pattern: &str) -> &'static Regex {
    cell.get_or_init(|| Regex::new(pattern).expect("valid pattern"))
}

/// Unit and currency words dropped after a number ("18 dollars", "5 cm", "3 hours").
const UNITS: &[&str] = &[
    "dollars", "dollar", "cents", "cent", "usd", "euros", "euro", "pounds", "yuan", "units",
    "unit", "square", "sq", "cubic", "meters", "meter", "metres", "m", "cm", "mm", "km", "inches",
    "inch", "in", "feet", "foot", "ft", "yards", "yd", "miles", "mile", "mi", "mph", "kg", "g",
    "grams", "gram", "pounds", "lbs", "lb", "oz", "ounces", "liters", "litres", "l", "ml",
    "gallons", "hours", "hour", "hrs", "hr", "h", "minutes", "minute", "min", "mins", "seconds",
    "second", "sec", "s", "days", "day", "weeks", "week", "months", "month", "years", "year",
    "degrees", "degree", "percent", "people", "students", "apples", "cookies", "times", "points",
    "per", "each", "of", "and", "total",
];

pub fn normalize(answer: &str) -> Normalized {
    let mut s = answer.trim().to_string();
    // math-mode delimiters
    for (open, close) in [("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$")] {
        if s.len() >= open.len() + close.len() && s.starts_with(open) && s.ends_with(close) {
            s = s[open.len()..s.len() - close.len()].trim().to_string();
        }
    }
    // `\text{...}` and friends keep their content
    static TEXT: OnceLock<Regex> = OnceLock::new();
    let text = re(
        &TEXT,
        r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}",
    );
    s = text.replace_all(&s, "$1").into_owned();
    for (from, to) in [
        ("\\left", ""),
        ("\\right", ""),
        ("\\displaystyle", ""),
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", ""),
        ("\\:", ""),
        ("\\quad", " "),
        ("\\qquad", " "),
        ("\\ ", " "),
        ("~", " "),
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("\\circ", ""),
        ("°", ""),
        ("\\$", ""),
        ("$", ""),
        ("€", ""),
        ("£", ""),
    ] {
        s = s.replace(from, to);
    }
    let mut percent = false;
    if let Some(stripped) = s
        .trim_end()
        .strip_suffix("\\%")
        .or_else(|| s.trim_end().strip_suffix('%'))
    {
        s = stripped.to_string();
        percent = true;
    }
    s = s.trim().trim_end_matches('.').trim().to_string();
    // thousands separators: 1,234,567.5 → 1234567.5 (only groups of exactly three digits)
    static THOUSANDS: OnceLock<Regex> = OnceLock::new();
    let thousands = re(&THOUSANDS, r"\b\d{1,3}(?:,\d{3})+\b");
    s = thousands
        .replace_all(&s, |c: &regex::Captures| c[0].replace(',', ""))
        .into_owned();
    // "x = 5" / "x=5" with one variable on the left: the value is what is compared, but keep
    // the equation when the left side is not a single variable.
    static ASSIGN: OnceLock<Regex> = OnceLock::new();
    if let Some(c) = re(&ASSIGN, r"^[a-zA-Z]\s*=\s*([^=]+)$").captures(&s) {
        s = c[1].trim().to_string();
    }
    // mixed numbers: 2\frac{1}{2} and 2 1/2 mean 5/2
    static MIXED: OnceLock<Regex> = OnceLock::new();
    let mixed = re(
        &MIXED,
        r"^(-?)(\d+)\s*(?:\\frac\{(\d+)\}\{(\d+)\}|\s(\d+)/(\d+))$",
    );
    if let Some(c) = mixed.captures(&s) {
        let (num, den) = match (c.get(3), c.get(4)) {
            (Some(n), Some(d)) => (n.as_str(), d.as_str()),
            _ => (&c[5], &c[6]),
        };
        s = format!("{}({}+{}/{})", &c[1], &c[2], num, den);
    }
    // unit words after a number: "18 dollars", "5 square feet"
    static UNIT: OnceLock<Regex> = OnceLock::new();
    let unit = re(&UNIT, r"^(-?[\d.]+(?:/\d+)?)\s*([a-zA-Z][a-zA-Z\s.^\d]*)$");
    if let Some(c) = unit.captures(&s) {
        let words = c[2].to_lowercase();
        let all_units = words
            .split(|ch: char| ch.is_whitespace() || ch == '.' || ch == '^' || ch.is_ascii_digit())
            .filter(|w| !w.is_empty())
            .all(|w| UNITS.contains(&w));
        if all_units {
            s = c[1].to_string();
        }
    }
    // a multiple-choice letter in parentheses: "(B)" → "B"
    static CHOICE: OnceLock<Regex> = OnceLock::new();
    if let Some(c) = re(&CHOICE, r"^\(([A-Ea-e])\)$").captures(&s) {
        s = c[1].to_string();
    }
    Normalized {
        text: s.trim().to_string(),
        percent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples() {
        let n = |s: &str| normalize(s).text;
        assert_eq!(n("$1,234.50$"), "1234.50");
        assert_eq!(n("\\$18 dollars"), "18");
        assert_eq!(n("\\left( 1, 2 \\right)"), "( 1, 2 )");
        assert_eq!(n("90^\\circ"), "90");
        assert_eq!(n("x = \\dfrac{3}{4}"), "\\frac{3}{4}");
        assert_eq!(n("2\\frac{1}{2}"), "(2+1/2)");
        assert_eq!(n("\\text{(C)}"), "C");
        assert!(normalize("50\\%").percent);
        assert_eq!(n("5 apples"), "5");
        assert_eq!(n("5 x"), "5 x");
    }
}
