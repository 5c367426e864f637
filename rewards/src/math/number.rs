//! Numbers of the answer checker: exact rationals (i128) while they fit, f64 beyond.

use std::cmp::Ordering;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Num {
    /// `num / den`, `den > 0`, in lowest terms.
    Exact(i128, i128),
    Approx(f64),
}

fn gcd(mut a: i128, mut b: i128) -> i128 {
    a = a.abs();
    b = b.abs();
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl Num {
    pub fn int(n: i128) -> Num {
        Num::Exact(n, 1)
    }

    /// `n / d` reduced; `None` for d = 0.
    pub fn ratio(n: i128, d: i128) -> Option<Num> {
        if d == 0 {
            return None;
        }
        let g = gcd(n, d).max(1);
        let (n, d) = (n / g, d / g);
        Some(if d < 0 {
            match (n.checked_neg(), d.checked_neg()) {
                (Some(n), Some(d)) => Num::Exact(n, d),
                _ => Num::Approx(n as f64 / d as f64),
            }
        } else {
            Num::Exact(n, d)
        })
    }

    /// A decimal literal such as `12.50`, exactly.
    pub fn parse_decimal(s: &str) -> Option<Num> {
        let (int, frac) = s.split_once('.').unwrap_or((s, ""));
        if int.is_empty() && frac.is_empty() {
            return None;
        }
        if !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
            return None;
        }
        let digits = format!("{int}{frac}");
        let digits = digits.trim_start_matches('0');
        if digits.len() <= 30 && frac.len() <= 30 {
            let n: i128 = if digits.is_empty() {
                0
            } else {
                digits.parse().ok()?
            };
            return Num::ratio(n, 10i128.pow(frac.len() as u32));
        }
        s.parse::<f64>().ok().map(Num::Approx)
    }

    pub fn to_f64(self) -> f64 {
        match self {
            Num::Exact(n, d) => n as f64 / d as f64,
            Num::Approx(x) => x,
        }
    }

    pub fn is_finite(self) -> bool {
        self.to_f64().is_finite()
    }

    pub fn is_zero(self) -> bool {
        match self {
            Num::Exact(n, _) => n == 0,
            Num::Approx(x) => x == 0.0,
        }
    }

    pub fn negate(self) -> Num {
        match self {
            Num::Exact(n, d) => n
                .checked_neg()
                .map_or(Num::Approx(-(n as f64) / d as f64), |n| Num::Exact(n, d)),
            Num::Approx(x) => Num::Approx(-x),
        }
    }

    pub fn plus(self, o: Num) -> Num {
        if let (Num::Exact(a, b), Num::Exact(c, d)) = (self, o) {
            let exact = (|| {
                Num::ratio(
                    a.checked_mul(d)?.checked_add(c.checked_mul(b)?)?,
                    b.checked_mul(d)?,
                )
            })();
            if let Some(r) = exact {
                return r;
            }
        }
        Num::Approx(self.to_f64() + o.to_f64())
    }

    pub fn minus(self, o: Num) -> Num {
        self.plus(o.negate())
    }

    pub fn times(self, o: Num) -> Num {
        if let (Num::Exact(a, b), Num::Exact(c, d)) = (self, o) {
            let (g1, g2) = (gcd(a, d).max(1), gcd(c, b).max(1));
            let exact =
                (|| Num::ratio((a / g1).checked_mul(c / g2)?, (b / g2).checked_mul(d / g1)?))();
            if let Some(r) = exact {
                return r;
            }
        }
        Num::Approx(self.to_f64() * o.to_f64())
    }

    /// `None` on division by zero.
    pub fn divide(self, o: Num) -> Option<Num> {
        if o.is_zero() {
            return None;
        }
        match o {
            Num::Exact(c, d) => Some(self.times(Num::ratio(d, c)?)),
            Num::Approx(x) => Some(Num::Approx(self.to_f64() / x)),
        }
    }

    /// Exact for small integer exponents; f64 otherwise (which may overflow to infinity).
    pub fn pow(self, e: Num) -> Num {
        if let (Num::Exact(_, _), Num::Exact(k, 1)) = (self, e) {
            if k.abs() <= 256 {
                let mut acc = Num::int(1);
                let mut exact = true;
                for _ in 0..k.abs() {
                    acc = acc.times(self);
                    if matches!(acc, Num::Approx(_)) {
                        exact = false;
                        break;
                    }
                }
                if exact {
                    return if k < 0 {
                        Num::int(1).divide(acc).unwrap_or(Num::Approx(f64::NAN))
                    } else {
                        acc
                    };
                }
            }
        }
        Num::Approx(self.to_f64().powf(e.to_f64()))
    }

    /// Exact when the argument is a ratio of perfect squares.
    pub fn sqrt(self) -> Num {
        if let Num::Exact(n, d) = self {
            if n >= 0 {
                if let (Some(a), Some(b)) = (isqrt(n), isqrt(d)) {
                    return Num::Exact(a, b);
                }
            }
        }
        Num::Approx(self.to_f64().sqrt())
    }

    /// Equal exactly when both are exact, else within a relative tolerance.
    pub fn approx_eq(self, o: Num, rel_tol: f64) -> bool {
        match (self, o) {
            (Num::Exact(a, b), Num::Exact(c, d)) => a == c && b == d,
            _ => {
                let (x, y) = (self.to_f64(), o.to_f64());
                if !x.is_finite() || !y.is_finite() {
                    return false;
                }
                (x - y).abs() <= rel_tol * x.abs().max(y.abs()).max(1e-9)
            }
        }
    }

    pub fn cmp_f64(self, o: Num) -> Ordering {
        self.to_f64().total_cmp(&o.to_f64())
    }
}

fn isqrt(n: i128) -> Option<i128> {
    if n < 0 {
        return None;
    }
    let r = (n as f64).sqrt().round() as i128;
    (r.saturating_sub(1)..=r + 1).find(|&c| c >= 0 && c.checked_mul(c) == Some(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_arithmetic_and_fallback() {
        let half = Num::ratio(1, 2).unwrap();
        assert_eq!(half.plus(Num::ratio(1, 3).unwrap()), Num::Exact(5, 6));
        assert_eq!(Num::parse_decimal("0.50").unwrap(), half);
        assert_eq!(Num::int(8).sqrt(), Num::Approx(8f64.sqrt()));
        assert_eq!(Num::ratio(9, 4).unwrap().sqrt(), Num::Exact(3, 2));
        assert_eq!(Num::int(2).pow(Num::int(-2)), Num::Exact(1, 4));
        assert!(Num::int(1).divide(Num::int(0)).is_none());
        // 10^(10^10) overflows to infinity, never allocates or loops for long
        let huge = Num::int(10).pow(Num::int(10).pow(Num::int(10)));
        assert!(!huge.is_finite());
        assert!(matches!(
            Num::int(i128::MAX).plus(Num::int(1)),
            Num::Approx(_)
        ));
    }
}
