//! Tokens to a [`Route`]: the grammar in the module docs.

use std::borrow::Cow;

use super::lex::{Lexer, Tok, keyword};
use super::{Expr, FUNCS, Op, Route, RouteError, SYSTEM, Sink, Source, Value, err};

/// Deepest nesting of a condition.
const MAX_DEPTH: usize = 64;

struct Parser {
    lx: Lexer,
    depth: usize,
}

/// Parses one route.
///
/// # Errors
/// The column and the reason of the first problem.
pub fn parse(text: &str) -> Result<Route, RouteError> {
    let mut p = Parser {
        lx: Lexer::new(text),
        depth: 0,
    };
    let (col, first) = p.lx.next()?;
    if !keyword(&first, "FROM") {
        return err(col, format!("a route starts with FROM, found {first}"));
    }
    let (col, path) = p.lx.raw_word();
    let source = parse_source(&path).map_err(|reason| RouteError { column: col, reason })?;
    let (col, tok) = p.lx.next()?;
    let condition = if keyword(&tok, "WHERE") {
        let e = p.or()?;
        let (col, tok) = p.lx.next()?;
        if !keyword(&tok, "INTO") {
            return err(col, format!("expected INTO or an operator, found {tok}"));
        }
        Some(e)
    } else if keyword(&tok, "INTO") {
        None
    } else {
        return err(col, format!("expected WHERE or INTO after the source, found {tok}"));
    };
    let sink = p.sink()?;
    let (col, tok) = p.lx.next()?;
    if tok != Tok::End {
        return err(col, format!("unexpected {tok} after the sink"));
    }
    Ok(Route {
        source,
        condition,
        sink,
    })
}

fn parse_source(path: &str) -> Result<Source, String> {
    if path.is_empty() {
        return Err("FROM needs a source such as /messages/*".into());
    }
    if let Some(filter) = path.strip_prefix("/topics/") {
        return check_filter(filter).map(|()| Source::Topics(filter.to_string()));
    }
    let levels: Vec<&str> = path.split('/').collect();
    let named = |s: &str| !s.is_empty() && s != "*";
    match levels.as_slice() {
        ["", "*"] => Ok(Source::All),
        ["", "messages", "*"] => Ok(Source::Messages),
        ["", "messages", "modules", "*"] => Ok(Source::AnyModule),
        ["", "messages", "modules", m, "*"] if named(m) => Ok(Source::Module((*m).to_string())),
        ["", "messages", "modules", m, "outputs", "*"] if named(m) => Ok(Source::ModuleOutputs((*m).to_string())),
        ["", "messages", "modules", m, "outputs", o] if named(m) && named(o) => {
            Ok(Source::ModuleOutput((*m).to_string(), (*o).to_string()))
        }
        _ => Err(format!(
            "unknown source `{path}`; use /*, /messages/*, /messages/modules/*, /messages/modules/<m>/*, \
             /messages/modules/<m>/outputs/*, /messages/modules/<m>/outputs/<o> or /topics/<filter>"
        )),
    }
}

/// Checks an MQTT topic filter.
pub fn check_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err("the topic filter is empty".into());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i != levels.len() - 1) {
            return Err(format!("`#` must be a whole last level in filter {filter:?}"));
        }
        if level.contains('+') && *level != "+" {
            return Err(format!("`+` must be a whole level in filter {filter:?}"));
        }
    }
    Ok(())
}

fn parse_input(path: &str) -> Result<Sink, String> {
    let levels: Vec<&str> = path.split('/').collect();
    let ok = |s: &&str| !s.is_empty() && !s.contains(['+', '#']);
    match levels.as_slice() {
        ["", "modules", m, "inputs", i] if ok(m) && ok(i) => Ok(Sink::Input {
            device: None,
            module: (*m).to_string(),
            input: (*i).to_string(),
        }),
        ["", "devices", d, "modules", m, "inputs", i] if ok(d) && ok(m) && ok(i) => Ok(Sink::Input {
            device: Some((*d).to_string()),
            module: (*m).to_string(),
            input: (*i).to_string(),
        }),
        _ => Err(format!(
            "BrokeredEndpoint takes \"/modules/<m>/inputs/<i>\" or \"/devices/<d>/modules/<m>/inputs/<i>\", not {path:?}"
        )),
    }
}

impl Parser {
    fn sink(&mut self) -> Result<Sink, RouteError> {
        let (col, tok) = self.lx.next()?;
        match &tok {
            Tok::Dollar(w) if w.eq_ignore_ascii_case("upstream") => Ok(Sink::Upstream),
            Tok::Dollar(w) if w.eq_ignore_ascii_case("local") => Ok(Sink::Local),
            Tok::Word(w) if w.eq_ignore_ascii_case("BrokeredEndpoint") || w.eq_ignore_ascii_case("topic") => {
                let (arg_col, arg) = self.string_arg()?;
                if w.eq_ignore_ascii_case("topic") {
                    if arg.is_empty() || arg.contains(['+', '#']) {
                        return err(arg_col, format!("topic({arg:?}) needs a topic name without wildcards"));
                    }
                    Ok(Sink::Topic(arg))
                } else {
                    parse_input(&arg).map_err(|reason| RouteError {
                        column: arg_col,
                        reason,
                    })
                }
            }
            _ => err(
                col,
                format!(
                    "expected a sink ($upstream, $local, BrokeredEndpoint(\"...\") or topic(\"...\")), found {tok}"
                ),
            ),
        }
    }

    fn string_arg(&mut self) -> Result<(usize, String), RouteError> {
        self.expect_tok(&Tok::LParen)?;
        let (col, tok) = self.lx.next()?;
        let Tok::Str(s) = tok else {
            return err(col, format!("expected a quoted string, found {tok}"));
        };
        self.expect_tok(&Tok::RParen)?;
        Ok((col, s))
    }

    fn expect_tok(&mut self, want: &Tok) -> Result<(), RouteError> {
        let (col, tok) = self.lx.next()?;
        if &tok == want {
            Ok(())
        } else {
            err(col, format!("expected {want}, found {tok}"))
        }
    }

    fn nest(&mut self, col: usize) -> Result<(), RouteError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return err(col, format!("the condition nests deeper than {MAX_DEPTH}"));
        }
        Ok(())
    }

    fn or(&mut self) -> Result<Expr, RouteError> {
        let col = self.lx.column();
        self.nest(col)?;
        let mut left = self.and()?;
        while keyword(self.lx.peek()?, "OR") {
            self.lx.next()?;
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        self.depth -= 1;
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, RouteError> {
        let mut left = self.not()?;
        while keyword(self.lx.peek()?, "AND") {
            self.lx.next()?;
            left = Expr::And(Box::new(left), Box::new(self.not()?));
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Expr, RouteError> {
        if keyword(self.lx.peek()?, "NOT") {
            let (col, _) = self.lx.next()?;
            self.nest(col)?;
            let inner = self.not()?;
            self.depth -= 1;
            return Ok(Expr::Not(Box::new(inner)));
        }
        self.compare()
    }

    fn compare(&mut self) -> Result<Expr, RouteError> {
        let left = self.sum()?;
        if let Tok::Op(op @ (Op::Eq | Op::Ne | Op::Lt | Op::Le | Op::Gt | Op::Ge)) = *self.lx.peek()? {
            self.lx.next()?;
            let right = self.sum()?;
            return Ok(Expr::Bin(op, Box::new(left), Box::new(right)));
        }
        Ok(left)
    }

    fn sum(&mut self) -> Result<Expr, RouteError> {
        let mut left = self.product()?;
        while let Tok::Op(op @ (Op::Add | Op::Sub)) = *self.lx.peek()? {
            self.lx.next()?;
            left = Expr::Bin(op, Box::new(left), Box::new(self.product()?));
        }
        Ok(left)
    }

    fn product(&mut self) -> Result<Expr, RouteError> {
        let mut left = self.unary()?;
        while let Tok::Op(op @ (Op::Mul | Op::Div | Op::Rem)) = *self.lx.peek()? {
            self.lx.next()?;
            left = Expr::Bin(op, Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Expr, RouteError> {
        if *self.lx.peek()? == Tok::Op(Op::Sub) {
            let (col, _) = self.lx.next()?;
            self.nest(col)?;
            let inner = self.unary()?;
            self.depth -= 1;
            return Ok(match inner {
                Expr::Lit(Value::Num(n)) => Expr::Lit(Value::Num(-n)),
                e => Expr::Neg(Box::new(e)),
            });
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Expr, RouteError> {
        let (col, tok) = self.lx.next()?;
        Ok(match tok {
            Tok::Num(n) => Expr::Lit(Value::Num(n)),
            Tok::Str(s) => Expr::Lit(Value::Str(Cow::Owned(s))),
            Tok::LParen => {
                let e = self.or()?;
                self.expect_tok(&Tok::RParen)?;
                e
            }
            Tok::Bracket(name) => Expr::App(name),
            Tok::Dollar(name) if name.eq_ignore_ascii_case("body") => {
                let mut path = Vec::new();
                while *self.lx.peek()? == Tok::Dot {
                    self.lx.next()?;
                    let (col, tok) = self.lx.next()?;
                    match tok {
                        Tok::Word(w) | Tok::Bracket(w) => path.push(w),
                        Tok::Num(n) if n.fract() == 0.0 && n >= 0.0 => path.push(format!("{n}")),
                        other => return err(col, format!("expected a field name after `.`, found {other}")),
                    }
                }
                Expr::Body(path)
            }
            Tok::Dollar(name) => {
                let lower = name.to_ascii_lowercase();
                match SYSTEM.iter().find(|(n, _)| *n == lower) {
                    Some((_, s)) => Expr::Sys(*s),
                    None => return err(col, format!("unknown system property `${name}`")),
                }
            }
            Tok::Word(w) if *self.lx.peek()? == Tok::LParen => {
                let upper = w.to_ascii_uppercase();
                let Some(&(_, func, min, max)) = FUNCS.iter().find(|(n, ..)| *n == upper) else {
                    return err(col, format!("unknown function `{w}`"));
                };
                self.lx.next()?;
                let mut args = Vec::new();
                if *self.lx.peek()? != Tok::RParen {
                    loop {
                        args.push(self.or()?);
                        if *self.lx.peek()? == Tok::Comma {
                            self.lx.next()?;
                        } else {
                            break;
                        }
                    }
                }
                self.expect_tok(&Tok::RParen)?;
                if args.len() < min || args.len() > max {
                    let want = if min == max {
                        format!("{min}")
                    } else {
                        format!("{min} to {max}")
                    };
                    return err(col, format!("{upper} takes {want} argument(s), got {}", args.len()));
                }
                Expr::Call(func, args)
            }
            Tok::Word(w) if w.eq_ignore_ascii_case("true") => Expr::Lit(Value::Bool(true)),
            Tok::Word(w) if w.eq_ignore_ascii_case("false") => Expr::Lit(Value::Bool(false)),
            Tok::Word(w) if w.eq_ignore_ascii_case("null") => Expr::Lit(Value::Null),
            Tok::Word(w)
                if ["AND", "OR", "NOT", "INTO", "WHERE", "FROM"]
                    .iter()
                    .any(|k| w.eq_ignore_ascii_case(k)) =>
            {
                return err(
                    col,
                    format!("expected a value, found keyword {}", w.to_ascii_uppercase()),
                );
            }
            Tok::Word(w) => Expr::App(w),
            other => return err(col, format!("expected a value, found {other}")),
        })
    }
}

// ------------------------------------------------------------ evaluation
