//! A small parser and evaluator for the answers of math problems: numbers, + − × ÷ ^,
//! `\frac`, `\sqrt`, `\pi`, implicit multiplication, one-letter variables; and the shapes answers
//! take around them: sets, tuples, intervals and equations.

use super::number::Num;
use crate::budget::Budget;

/// Deepest nesting of parentheses, braces and powers we parse (a stack guard).
const MAX_DEPTH: usize = 64;

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Num(Num),
    Var(char),
    Pi,
    E,
    Infinity,
    Neg(Box<Expr>),
    Add(Box<Expr>, Box<Expr>),
    Sub(Box<Expr>, Box<Expr>),
    Mul(Box<Expr>, Box<Expr>),
    Div(Box<Expr>, Box<Expr>),
    Pow(Box<Expr>, Box<Expr>),
    Sqrt(Box<Expr>),
    Root(Box<Expr>, Box<Expr>),
}

/// An answer: one expression or a bracketed collection of them.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Scalar(Expr),
    /// `{a, b}` or a bare list `a, b`: order does not matter.
    Set(Vec<Expr>),
    /// `(a, b)`, `[a, b]`, `(a, b]`...: order matters; the brackets are kept.
    Bracketed(char, Vec<Expr>, char),
    /// `lhs = rhs`.
    Equation(Expr, Expr),
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(String),
    Ident(char),
    Cmd(String),
    Op(char),
}

fn lex(s: &str, budget: &mut Budget) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        budget.spend(1).map_err(|e| e.to_string())?;
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            let start = i;
            if tex_digit_argument(&out) {
                // `\frac12`, `\sqrt2`: TeX takes a single digit as the argument
                i += 1;
                out.push(Tok::Num(chars[start..i].iter().collect()));
                continue;
            }
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                i += 1;
            }
            out.push(Tok::Num(chars[start..i].iter().collect()));
        } else if c == '\\' {
            let start = i + 1;
            i += 1;
            while i < chars.len() && chars[i].is_ascii_alphabetic() {
                i += 1;
            }
            if i == start {
                // escaped symbol: \{ \} \, etc.
                if let Some(&sym) = chars.get(i) {
                    out.push(Tok::Op(sym));
                    i += 1;
                }
                continue;
            }
            out.push(Tok::Cmd(chars[start..i].iter().collect()));
        } else if c.is_ascii_alphabetic() {
            let run = chars[i..]
                .iter()
                .take_while(|c| c.is_ascii_alphabetic())
                .count();
            if run >= 3 {
                return Err(format!(
                    "words in the answer ({:?})",
                    chars[i..i + run].iter().collect::<String>()
                ));
            }
            out.push(Tok::Ident(c));
            i += 1;
        } else if c == '*' && chars.get(i + 1) == Some(&'*') {
            out.push(Tok::Op('^'));
            i += 2;
        } else if "+-*/^(){}[],=".contains(c) {
            out.push(Tok::Op(c));
            i += 1;
        } else if c == '×' || c == '·' {
            out.push(Tok::Op('*'));
            i += 1;
        } else if c == '÷' {
            out.push(Tok::Op('/'));
            i += 1;
        } else if c == '−' {
            out.push(Tok::Op('-'));
            i += 1;
        } else if c == 'π' {
            out.push(Tok::Cmd("pi".into()));
            i += 1;
        } else if c == '√' {
            out.push(Tok::Cmd("sqrt".into()));
            i += 1;
        } else if c == '∞' {
            out.push(Tok::Cmd("infty".into()));
            i += 1;
        } else {
            return Err(format!("unexpected character {c:?}"));
        }
    }
    Ok(out)
}

/// Whether the next number is a brace-less TeX argument (`\frac12`, `\sqrt2`).
fn tex_digit_argument(out: &[Tok]) -> bool {
    let is_frac = |t: &Tok| matches!(t, Tok::Cmd(c) if c == "frac" || c == "dfrac" || c == "tfrac");
    match out {
        [.., Tok::Cmd(c)] if c == "sqrt" => true,
        [.., t] if is_frac(t) => true,
        [.., t, Tok::Num(n)] if is_frac(t) && n.len() == 1 => true,
        _ => false,
    }
}

struct Parser<'a> {
    toks: &'a [Tok],
    pos: usize,
    depth: usize,
    budget: &'a mut Budget,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn eat(&mut self, op: char) -> bool {
        if self.peek() == Some(&Tok::Op(op)) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, op: char) -> Result<(), String> {
        if self.eat(op) {
            Ok(())
        } else {
            Err(format!("expected {op:?} at token {}", self.pos))
        }
    }

    fn enter(&mut self) -> Result<(), String> {
        self.depth += 1;
        self.budget.spend(1).map_err(|e| e.to_string())?;
        if self.depth > MAX_DEPTH {
            return Err("expression nested too deeply".into());
        }
        Ok(())
    }

    fn expr(&mut self) -> Result<Expr, String> {
        self.enter()?;
        let mut lhs = self.term()?;
        loop {
            if self.eat('+') {
                lhs = Expr::Add(Box::new(lhs), Box::new(self.term()?));
            } else if self.eat('-') {
                lhs = Expr::Sub(Box::new(lhs), Box::new(self.term()?));
            } else {
                break;
            }
        }
        self.depth -= 1;
        Ok(lhs)
    }

    fn term(&mut self) -> Result<Expr, String> {
        let mut lhs = self.unary()?;
        loop {
            self.budget.spend(1).map_err(|e| e.to_string())?;
            if self.eat('*') || self.eat_cmd(&["cdot", "times"]) {
                lhs = Expr::Mul(Box::new(lhs), Box::new(self.unary()?));
            } else if self.eat('/') || self.eat_cmd(&["div"]) {
                lhs = Expr::Div(Box::new(lhs), Box::new(self.unary()?));
            } else if self.starts_atom() {
                lhs = Expr::Mul(Box::new(lhs), Box::new(self.power()?));
            } else {
                break;
            }
        }
        Ok(lhs)
    }

    fn eat_cmd(&mut self, names: &[&str]) -> bool {
        if let Some(Tok::Cmd(c)) = self.peek() {
            if names.contains(&c.as_str()) {
                self.pos += 1;
                return true;
            }
        }
        false
    }

    fn starts_atom(&self) -> bool {
        match self.peek() {
            Some(Tok::Num(_)) | Some(Tok::Ident(_)) => true,
            Some(Tok::Op(c)) => *c == '(' || *c == '{',
            Some(Tok::Cmd(c)) => matches!(c.as_str(), "frac" | "sqrt" | "pi" | "infty"),
            None => false,
        }
    }

    fn unary(&mut self) -> Result<Expr, String> {
        self.enter()?;
        let e = if self.eat('-') {
            Expr::Neg(Box::new(self.unary()?))
        } else if self.eat('+') {
            self.unary()?
        } else {
            self.power()?
        };
        self.depth -= 1;
        Ok(e)
    }

    fn power(&mut self) -> Result<Expr, String> {
        let base = self.atom()?;
        if self.eat('^') {
            self.enter()?;
            let exp = self.unary_or_group()?;
            self.depth -= 1;
            return Ok(Expr::Pow(Box::new(base), Box::new(exp)));
        }
        Ok(base)
    }

    /// After `^` or as a `\frac` argument: `{...}`, or a single digit / letter / atom.
    fn unary_or_group(&mut self) -> Result<Expr, String> {
        match self.peek() {
            Some(Tok::Op('{')) => self.atom(),
            Some(Tok::Op('-')) => self.unary(),
            _ => self.atom(),
        }
    }

    fn group(&mut self) -> Result<Expr, String> {
        self.expect('{')?;
        let e = self.expr()?;
        self.expect('}')?;
        Ok(e)
    }

    fn atom(&mut self) -> Result<Expr, String> {
        self.budget.spend(1).map_err(|e| e.to_string())?;
        let tok = self.peek().cloned().ok_or("unexpected end of expression")?;
        self.pos += 1;
        match tok {
            Tok::Num(n) => Num::parse_decimal(&n)
                .map(Expr::Num)
                .ok_or_else(|| format!("bad number {n:?}")),
            Tok::Ident('e') => Ok(Expr::E),
            Tok::Ident(c) => Ok(Expr::Var(c)),
            Tok::Op('(') => {
                self.enter()?;
                let e = self.expr()?;
                self.expect(')')?;
                self.depth -= 1;
                Ok(e)
            }
            Tok::Op('{') => {
                self.pos -= 1;
                self.enter()?;
                let e = self.group()?;
                self.depth -= 1;
                Ok(e)
            }
            Tok::Cmd(c) => match c.as_str() {
                "pi" => Ok(Expr::Pi),
                "infty" | "infinity" => Ok(Expr::Infinity),
                "frac" | "dfrac" | "tfrac" => {
                    self.enter()?;
                    let num = self.unary_or_group()?;
                    let den = self.unary_or_group()?;
                    self.depth -= 1;
                    Ok(Expr::Div(Box::new(num), Box::new(den)))
                }
                "sqrt" => {
                    self.enter()?;
                    let e = if self.eat('[') {
                        let n = self.expr()?;
                        self.expect(']')?;
                        let x = self.unary_or_group()?;
                        Expr::Root(Box::new(n), Box::new(x))
                    } else {
                        Expr::Sqrt(Box::new(self.unary_or_group()?))
                    };
                    self.depth -= 1;
                    Ok(e)
                }
                other => Err(format!("unsupported command \\{other}")),
            },
            other => Err(format!("unexpected {other:?}")),
        }
    }
}

fn parse_expr(toks: &[Tok], budget: &mut Budget) -> Result<Expr, String> {
    if toks.is_empty() {
        return Err("empty expression".into());
    }
    let mut p = Parser {
        toks,
        pos: 0,
        depth: 0,
        budget,
    };
    let e = p.expr()?;
    if p.pos != p.toks.len() {
        return Err(format!(
            "unexpected {:?} after the expression",
            p.toks[p.pos]
        ));
    }
    Ok(e)
}

/// Splits tokens at top-level commas (outside every bracket).
fn split_commas(toks: &[Tok]) -> Vec<&[Tok]> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, t) in toks.iter().enumerate() {
        match t {
            Tok::Op('(') | Tok::Op('[') | Tok::Op('{') => depth += 1,
            Tok::Op(')') | Tok::Op(']') | Tok::Op('}') => depth -= 1,
            Tok::Op(',') if depth == 0 => {
                parts.push(&toks[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&toks[start..]);
    parts
}

/// Whether the bracket at 0 closes exactly at the last token, ignoring bracket kinds (so
/// `(0, 1]` is one group and `(1)+(2)` is not).
fn encloses(toks: &[Tok]) -> bool {
    let mut depth = 0i32;
    for (i, t) in toks.iter().enumerate() {
        match t {
            Tok::Op('(') | Tok::Op('[') | Tok::Op('{') => depth += 1,
            Tok::Op(')') | Tok::Op(']') | Tok::Op('}') => {
                depth -= 1;
                if depth == 0 && i + 1 != toks.len() {
                    return false;
                }
            }
            _ => {}
        }
    }
    depth == 0
}

/// Parses a normalised answer string.
pub fn parse_answer(s: &str, budget: &mut Budget) -> Result<Answer, String> {
    let toks = lex(s, budget)?;
    let eqs: Vec<usize> = toks
        .iter()
        .enumerate()
        .filter(|(_, t)| **t == Tok::Op('='))
        .map(|(i, _)| i)
        .collect();
    if let [eq] = eqs.as_slice() {
        let lhs = parse_expr(&toks[..*eq], budget)?;
        let rhs = parse_expr(&toks[eq + 1..], budget)?;
        return Ok(Answer::Equation(lhs, rhs));
    }
    if eqs.len() > 1 {
        return Err("more than one '='".into());
    }
    let (Some(first), Some(last)) = (toks.first(), toks.last()) else {
        return Err("empty answer".into());
    };
    let open = matches!(first, Tok::Op('(') | Tok::Op('[') | Tok::Op('{'));
    let close = matches!(last, Tok::Op(')') | Tok::Op(']') | Tok::Op('}'));
    if open && close && toks.len() >= 2 && (first == &Tok::Op('{') || encloses(&toks)) {
        let inner = &toks[1..toks.len() - 1];
        let parts = split_commas(inner);
        if parts.len() > 1 || first == &Tok::Op('{') && encloses(&toks) {
            let items = parts
                .into_iter()
                .map(|p| parse_expr(p, budget))
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(match (first, last) {
                (Tok::Op('{'), Tok::Op('}')) => Answer::Set(items),
                (Tok::Op(a), Tok::Op(b)) => Answer::Bracketed(*a, items, *b),
                _ => unreachable!("checked above"),
            });
        }
    }
    let parts = split_commas(&toks);
    if parts.len() > 1 {
        let items = parts
            .into_iter()
            .map(|p| parse_expr(p, budget))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(Answer::Set(items));
    }
    Ok(Answer::Scalar(parse_expr(&toks, budget)?))
}

/// Values for the variables of an expression.
pub type Env<'a> = &'a [(char, f64)];

pub fn eval(e: &Expr, env: Env, budget: &mut Budget) -> Result<Num, String> {
    budget.spend(1).map_err(|e| e.to_string())?;
    let r = match e {
        Expr::Num(n) => *n,
        Expr::Var(c) => env
            .iter()
            .find(|(v, _)| v == c)
            .map(|(_, x)| Num::Approx(*x))
            .ok_or_else(|| format!("free variable {c}"))?,
        Expr::Pi => Num::Approx(std::f64::consts::PI),
        Expr::E => Num::Approx(std::f64::consts::E),
        Expr::Infinity => Num::Approx(f64::INFINITY),
        Expr::Neg(a) => eval(a, env, budget)?.negate(),
        Expr::Add(a, b) => eval(a, env, budget)?.plus(eval(b, env, budget)?),
        Expr::Sub(a, b) => eval(a, env, budget)?.minus(eval(b, env, budget)?),
        Expr::Mul(a, b) => eval(a, env, budget)?.times(eval(b, env, budget)?),
        Expr::Div(a, b) => eval(a, env, budget)?
            .divide(eval(b, env, budget)?)
            .ok_or("division by zero")?,
        Expr::Pow(a, b) => eval(a, env, budget)?.pow(eval(b, env, budget)?),
        Expr::Sqrt(a) => eval(a, env, budget)?.sqrt(),
        Expr::Root(n, a) => {
            let n = eval(n, env, budget)?.to_f64();
            let x = eval(a, env, budget)?.to_f64();
            let r = if x < 0.0 && n.fract() == 0.0 && n as i64 % 2 == 1 {
                -(-x).powf(1.0 / n)
            } else {
                x.powf(1.0 / n)
            };
            Num::Approx(r)
        }
    };
    Ok(r)
}

pub fn variables(e: &Expr, out: &mut Vec<char>) {
    match e {
        Expr::Var(c) => {
            if !out.contains(c) {
                out.push(*c);
            }
        }
        Expr::Neg(a) | Expr::Sqrt(a) => variables(a, out),
        Expr::Add(a, b)
        | Expr::Sub(a, b)
        | Expr::Mul(a, b)
        | Expr::Div(a, b)
        | Expr::Pow(a, b)
        | Expr::Root(a, b) => {
            variables(a, out);
            variables(b, out);
        }
        Expr::Num(_) | Expr::Pi | Expr::E | Expr::Infinity => {}
    }
}
