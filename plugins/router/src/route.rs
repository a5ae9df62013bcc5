//! The route language: `FROM <source> [WHERE <condition>] INTO <sink>`.
//!
//! The grammar, keywords case-insensitive:
//!
//! ```text
//! route      = "FROM" source [ "WHERE" condition ] "INTO" sink
//! source     = "/*" | "/messages/*" | "/messages/modules/*"
//!            | "/messages/modules/" module "/*"
//!            | "/messages/modules/" module "/outputs/*"
//!            | "/messages/modules/" module "/outputs/" output
//!            | "/topics/" mqtt-topic-filter
//! sink       = "$upstream" | "$local"
//!            | "BrokeredEndpoint(" string ")"   string: "/modules/{m}/inputs/{i}"
//!                                                 or "/devices/{d}/modules/{m}/inputs/{i}"
//!            | "topic(" string ")"
//! condition  = or
//! or         = and { "OR" and }
//! and        = not { "AND" not }
//! not        = "NOT" not | compare
//! compare    = sum [ ( "=" | "!=" | "<>" | "<" | "<=" | ">" | ">=" ) sum ]
//! sum        = product { ( "+" | "-" ) product }
//! product    = unary { ( "*" | "/" | "%" ) unary }
//! unary      = "-" unary | primary
//! primary    = number | string | "true" | "false" | "null"
//!            | "(" condition ")" | function "(" [ condition { "," condition } ] ")"
//!            | "$body" { "." name } | "$" name | name | "[" any text but "]" "]"
//! string     = "'" text "'" | '"' text '"'     (a doubled quote inside is one quote)
//! ```
//!
//! Values are undefined, null, booleans, numbers and strings. A missing
//! property or body field is undefined; a comparison with undefined, or of
//! two different types, is undefined, and a route matches only when its
//! condition is `true`. A string compared or added to a number is read as a
//! number when it is one (application properties are always strings).

use std::borrow::Cow;
use std::cell::OnceCell;
use std::fmt;

use holdfast_sdk::iothub::{self, Topic, system};
use holdfast_sdk::router::{Message, topic_matches};

/// A route that failed to parse: where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteError {
    /// 1-based character column in the route text.
    pub column: usize,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for RouteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "column {}: {}", self.column, self.reason)
    }
}

/// Where a route takes messages from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `/*`: every message.
    All,
    /// `/messages/*`: telemetry of any device or module.
    Messages,
    /// `/messages/modules/*`: what any module sends.
    AnyModule,
    /// `/messages/modules/{m}/*`.
    Module(String),
    /// `/messages/modules/{m}/outputs/*`: any named output of a module.
    ModuleOutputs(String),
    /// `/messages/modules/{m}/outputs/{o}`.
    ModuleOutput(String, String),
    /// `/topics/{filter}`: plain MQTT topics matching the filter.
    Topics(String),
}

/// Where a route sends messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    /// `$upstream`: the outbox.
    Upstream,
    /// `$local`: local subscribers of the message's own topic.
    Local,
    /// A module input; `device` `None` means the publisher's device.
    Input {
        /// The device the module belongs to.
        device: Option<String>,
        /// Module id.
        module: String,
        /// Input name.
        input: String,
    },
    /// Local subscribers of another topic.
    Topic(String),
}

/// A parsed route.
#[derive(Debug, Clone)]
pub struct Route {
    /// Where from.
    pub source: Source,
    /// The condition, if any.
    pub condition: Option<Expr>,
    /// Where to.
    pub sink: Sink,
}

/// A value during evaluation; strings borrow from the route or the
/// message where they can.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    /// Missing.
    Undefined,
    /// JSON null.
    Null,
    /// A boolean.
    Bool(bool),
    /// A number.
    Num(f64),
    /// A string.
    Str(Cow<'a, str>),
    /// A JSON object or array from the body.
    Composite,
}

impl Value<'_> {
    /// The same value, borrowing its string.
    fn reborrow(&self) -> Value<'_> {
        match self {
            Value::Str(s) => Value::Str(Cow::Borrowed(s)),
            Value::Undefined => Value::Undefined,
            Value::Null => Value::Null,
            Value::Bool(b) => Value::Bool(*b),
            Value::Num(n) => Value::Num(*n),
            Value::Composite => Value::Composite,
        }
    }
}

/// A system property.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sys {
    /// `$contentType`.
    ContentType,
    /// `$contentEncoding`.
    ContentEncoding,
    /// `$messageId`.
    MessageId,
    /// `$correlationId`.
    CorrelationId,
    /// `$userId`.
    UserId,
    /// `$connectionDeviceId`.
    DeviceId,
    /// `$connectionModuleId`.
    ModuleId,
    /// `$outputName`.
    OutputName,
    /// `$topic` (Holdfast): the MQTT topic.
    Topic,
    /// `$clientId` (Holdfast): the publisher's MQTT client id.
    ClientId,
}

const SYSTEM: &[(&str, Sys)] = &[
    ("contenttype", Sys::ContentType),
    ("contentencoding", Sys::ContentEncoding),
    ("messageid", Sys::MessageId),
    ("correlationid", Sys::CorrelationId),
    ("userid", Sys::UserId),
    ("connectiondeviceid", Sys::DeviceId),
    ("connectionmoduleid", Sys::ModuleId),
    ("outputname", Sys::OutputName),
    ("topic", Sys::Topic),
    ("clientid", Sys::ClientId),
];

/// A built-in function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Func {
    /// `IS_DEFINED(x)`.
    IsDefined,
    /// `IS_STRING(x)`.
    IsString,
    /// `IS_NUMBER(x)`.
    IsNumber,
    /// `IS_BOOL(x)`.
    IsBool,
    /// `IS_NULL(x)`.
    IsNull,
    /// `LOWER(s)`.
    Lower,
    /// `UPPER(s)`.
    Upper,
    /// `LENGTH(s)`: characters.
    Length,
    /// `CONCAT(s, ...)`.
    Concat,
    /// `SUBSTRING(s, start [, length])`, 0-based characters.
    Substring,
    /// `INDEX_OF(s, sub)`: -1 when absent.
    IndexOf,
    /// `STARTS_WITH(s, prefix)`.
    StartsWith,
    /// `ENDS_WITH(s, suffix)`.
    EndsWith,
    /// `CONTAINS(s, sub)`.
    Contains,
    /// `LTRIM(s)`.
    Ltrim,
    /// `RTRIM(s)`.
    Rtrim,
    /// `TRIM(s)`.
    Trim,
    /// `ABS(n)`.
    Abs,
    /// `FLOOR(n)`.
    Floor,
    /// `CEILING(n)`.
    Ceiling,
}

/// Name, function, least and most arguments.
const FUNCS: &[(&str, Func, usize, usize)] = &[
    ("IS_DEFINED", Func::IsDefined, 1, 1),
    ("IS_STRING", Func::IsString, 1, 1),
    ("IS_NUMBER", Func::IsNumber, 1, 1),
    ("IS_BOOL", Func::IsBool, 1, 1),
    ("IS_NULL", Func::IsNull, 1, 1),
    ("LOWER", Func::Lower, 1, 1),
    ("UPPER", Func::Upper, 1, 1),
    ("LENGTH", Func::Length, 1, 1),
    ("CONCAT", Func::Concat, 1, 16),
    ("SUBSTRING", Func::Substring, 2, 3),
    ("INDEX_OF", Func::IndexOf, 2, 2),
    ("STARTS_WITH", Func::StartsWith, 2, 2),
    ("ENDS_WITH", Func::EndsWith, 2, 2),
    ("CONTAINS", Func::Contains, 2, 2),
    ("LTRIM", Func::Ltrim, 1, 1),
    ("RTRIM", Func::Rtrim, 1, 1),
    ("TRIM", Func::Trim, 1, 1),
    ("ABS", Func::Abs, 1, 1),
    ("FLOOR", Func::Floor, 1, 1),
    ("CEILING", Func::Ceiling, 1, 1),
];

/// A binary operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `=`
    Eq,
    /// `!=` or `<>`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `+`
    Add,
    /// `-`
    Sub,
    /// `*`
    Mul,
    /// `/`
    Div,
    /// `%`
    Rem,
}

/// A condition expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// A literal.
    Lit(Value<'static>),
    /// A system property.
    Sys(Sys),
    /// An application property (MQTT user property or property-bag entry).
    App(String),
    /// A field of the JSON body; empty path is the whole body.
    Body(Vec<String>),
    /// `NOT`.
    Not(Box<Expr>),
    /// `AND`.
    And(Box<Expr>, Box<Expr>),
    /// `OR`.
    Or(Box<Expr>, Box<Expr>),
    /// Unary minus.
    Neg(Box<Expr>),
    /// A comparison or arithmetic.
    Bin(Op, Box<Expr>, Box<Expr>),
    /// A function call.
    Call(Func, Vec<Expr>),
}

// ---------------------------------------------------------------- lexing

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Dollar(String),
    Bracket(String),
    Str(String),
    Num(f64),
    Op(Op),
    LParen,
    RParen,
    Comma,
    Dot,
    End,
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Word(w) => write!(f, "`{w}`"),
            Tok::Dollar(w) => write!(f, "`${w}`"),
            Tok::Bracket(w) => write!(f, "`[{w}]`"),
            Tok::Str(s) => write!(f, "string '{s}'"),
            Tok::Num(n) => write!(f, "number {n}"),
            Tok::Op(o) => write!(f, "operator {o:?}"),
            Tok::LParen => f.write_str("`(`"),
            Tok::RParen => f.write_str("`)`"),
            Tok::Comma => f.write_str("`,`"),
            Tok::Dot => f.write_str("`.`"),
            Tok::End => f.write_str("the end of the route"),
        }
    }
}

struct Lexer {
    chars: Vec<char>,
    pos: usize,
    peeked: Option<(usize, Tok)>,
}

fn err<T>(column: usize, reason: impl Into<String>) -> Result<T, RouteError> {
    Err(RouteError {
        column,
        reason: reason.into(),
    })
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '-'
}

impl Lexer {
    fn new(text: &str) -> Lexer {
        Lexer {
            chars: text.chars().collect(),
            pos: 0,
            peeked: None,
        }
    }

    fn skip_ws(&mut self) {
        while self.chars.get(self.pos).is_some_and(|c| c.is_whitespace()) {
            self.pos += 1;
        }
    }

    /// The 1-based column of the next token.
    fn column(&mut self) -> usize {
        if let Some((col, _)) = &self.peeked {
            return *col;
        }
        self.skip_ws();
        self.pos + 1
    }

    /// Everything up to the next whitespace (the source path).
    fn raw_word(&mut self) -> (usize, String) {
        self.skip_ws();
        let start = self.pos;
        while self.chars.get(self.pos).is_some_and(|c| !c.is_whitespace()) {
            self.pos += 1;
        }
        (start + 1, self.chars[start..self.pos].iter().collect())
    }

    fn peek(&mut self) -> Result<&Tok, RouteError> {
        let t = match self.peeked.take() {
            Some(t) => t,
            None => self.lex()?,
        };
        Ok(&self.peeked.insert(t).1)
    }

    fn next(&mut self) -> Result<(usize, Tok), RouteError> {
        match self.peeked.take() {
            Some(t) => Ok(t),
            None => self.lex(),
        }
    }

    fn word_while(&mut self, ok: impl Fn(char) -> bool) -> String {
        let start = self.pos;
        while self.chars.get(self.pos).copied().is_some_and(&ok) {
            self.pos += 1;
        }
        self.chars[start..self.pos].iter().collect()
    }

    fn lex(&mut self) -> Result<(usize, Tok), RouteError> {
        self.skip_ws();
        let col = self.pos + 1;
        let Some(&c) = self.chars.get(self.pos) else {
            return Ok((col, Tok::End));
        };
        let two = self.chars.get(self.pos + 1).copied();
        let (tok, len) = match (c, two) {
            ('(', _) => (Tok::LParen, 1),
            (')', _) => (Tok::RParen, 1),
            (',', _) => (Tok::Comma, 1),
            // `.5` is a number, but `$body.tags.1` is a path.
            ('.', Some(d)) if d.is_ascii_digit() && !self.after_word() => return self.number(col),
            ('.', _) => (Tok::Dot, 1),
            ('=', _) => (Tok::Op(Op::Eq), 1),
            ('!', Some('=')) | ('<', Some('>')) => (Tok::Op(Op::Ne), 2),
            ('<', Some('=')) => (Tok::Op(Op::Le), 2),
            ('>', Some('=')) => (Tok::Op(Op::Ge), 2),
            ('<', _) => (Tok::Op(Op::Lt), 1),
            ('>', _) => (Tok::Op(Op::Gt), 1),
            ('+', _) => (Tok::Op(Op::Add), 1),
            ('-', _) => (Tok::Op(Op::Sub), 1),
            ('*', _) => (Tok::Op(Op::Mul), 1),
            ('/', _) => (Tok::Op(Op::Div), 1),
            ('%', _) => (Tok::Op(Op::Rem), 1),
            ('\'' | '"', _) => return self.string(col, c),
            ('[', _) => {
                self.pos += 1;
                let name = self.word_while(|c| c != ']');
                if self.chars.get(self.pos) != Some(&']') {
                    return err(col, "`[` has no closing `]`");
                }
                self.pos += 1;
                if name.is_empty() {
                    return err(col, "`[]` names no property");
                }
                return Ok((col, Tok::Bracket(name)));
            }
            ('$', _) => {
                self.pos += 1;
                let name = self.word_while(is_word_char);
                if name.is_empty() {
                    return err(col, "`$` must be followed by a name");
                }
                return Ok((col, Tok::Dollar(name)));
            }
            (d, _) if d.is_ascii_digit() => return self.number(col),
            (w, _) if is_word_char(w) => return Ok((col, Tok::Word(self.word_while(is_word_char)))),
            (other, _) => return err(col, format!("unexpected character `{other}`")),
        };
        self.pos += len;
        Ok((col, tok))
    }

    fn after_word(&self) -> bool {
        self.pos > 0 && is_word_char(self.chars[self.pos - 1])
    }

    fn number(&mut self, col: usize) -> Result<(usize, Tok), RouteError> {
        let mut text = self.word_while(|c| c.is_ascii_digit());
        if self.chars.get(self.pos) == Some(&'.') && self.chars.get(self.pos + 1).is_some_and(char::is_ascii_digit) {
            self.pos += 1;
            text.push('.');
            text.push_str(&self.word_while(|c| c.is_ascii_digit()));
        }
        if matches!(self.chars.get(self.pos), Some('e' | 'E')) {
            text.push('e');
            self.pos += 1;
            if let Some(&s @ ('+' | '-')) = self.chars.get(self.pos) {
                text.push(s);
                self.pos += 1;
            }
            text.push_str(&self.word_while(|c| c.is_ascii_digit()));
        }
        match text.parse::<f64>() {
            Ok(n) if n.is_finite() => Ok((col, Tok::Num(n))),
            _ => err(col, format!("`{text}` is not a number")),
        }
    }

    fn string(&mut self, col: usize, quote: char) -> Result<(usize, Tok), RouteError> {
        self.pos += 1;
        let mut out = String::new();
        loop {
            match self.chars.get(self.pos) {
                None => return err(col, "the string has no closing quote"),
                Some(&c) if c == quote => {
                    if self.chars.get(self.pos + 1) == Some(&quote) {
                        out.push(quote);
                        self.pos += 2;
                    } else {
                        self.pos += 1;
                        return Ok((col, Tok::Str(out)));
                    }
                }
                Some(&c) => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
    }
}

fn keyword(t: &Tok, k: &str) -> bool {
    matches!(t, Tok::Word(w) if w.eq_ignore_ascii_case(k))
}

// --------------------------------------------------------------- parsing

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

/// Largest body the router parses as JSON.
const MAX_JSON_BODY: u64 = 256 << 10;

/// What a route sees of one message; each part is fetched from the host at
/// most once, and only if a route needs it.
pub struct View<'m, 'a> {
    msg: &'m Message<'a>,
    dialect: Option<Topic<'m>>,
    props: OnceCell<Vec<(String, String)>>,
    body: OnceCell<Option<serde_json::Value>>,
}

impl<'m, 'a> View<'m, 'a> {
    /// A view of `msg`.
    pub fn new(msg: &'m Message<'a>) -> View<'m, 'a> {
        View {
            dialect: iothub::parse(msg.topic()),
            msg,
            props: OnceCell::new(),
            body: OnceCell::new(),
        }
    }

    /// The dialect topic, if the message is on one.
    pub fn dialect(&self) -> Option<Topic<'m>> {
        self.dialect
    }

    fn prop(&self, name: &str) -> Option<&str> {
        self.props
            .get_or_init(|| self.msg.properties())
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The output name of a module's message.
    pub fn output(&self) -> Option<String> {
        match self.dialect()? {
            Topic::Output { output, .. } => Some(output.to_string()),
            Topic::Telemetry { module: Some(_), .. } => self.prop(system::OUTPUT).map(str::to_string),
            _ => None,
        }
    }

    fn sys<'s>(&'s self, s: Sys) -> Value<'s> {
        let text = |v: Option<&'s str>| v.map_or(Value::Undefined, |s| Value::Str(Cow::Borrowed(s)));
        match s {
            Sys::ContentType => match self.msg.content_type() {
                Some(ct) => Value::Str(Cow::Owned(ct)),
                None => text(self.prop(system::CONTENT_TYPE)),
            },
            Sys::ContentEncoding => text(self.prop(system::CONTENT_ENCODING)),
            Sys::MessageId => text(self.prop(system::MESSAGE_ID)),
            Sys::CorrelationId => text(self.prop(system::CORRELATION_ID)),
            Sys::UserId => text(self.prop(system::USER_ID)),
            Sys::DeviceId => text(self.dialect().map(|t| t.device())),
            Sys::ModuleId => text(self.dialect().and_then(|t| t.module())),
            Sys::OutputName => self.output().map_or(Value::Undefined, |o| Value::Str(Cow::Owned(o))),
            Sys::Topic => Value::Str(Cow::Borrowed(self.msg.topic())),
            Sys::ClientId => Value::Str(Cow::Owned(self.msg.source().client_id)),
        }
    }

    fn body(&self, path: &[String]) -> Value<'_> {
        let body = self.body.get_or_init(|| {
            if self.msg.payload_len() > MAX_JSON_BODY {
                return None;
            }
            serde_json::from_slice(&self.msg.payload()).ok()
        });
        let mut v = match body {
            Some(v) => v,
            None => return Value::Undefined,
        };
        for p in path {
            v = match v {
                serde_json::Value::Object(m) => match m.get(p) {
                    Some(v) => v,
                    None => return Value::Undefined,
                },
                serde_json::Value::Array(a) => match p.parse::<usize>().ok().and_then(|i| a.get(i)) {
                    Some(v) => v,
                    None => return Value::Undefined,
                },
                _ => return Value::Undefined,
            };
        }
        match v {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::Number(n) => n.as_f64().map_or(Value::Undefined, Value::Num),
            serde_json::Value::String(s) => Value::Str(Cow::Borrowed(s)),
            _ => Value::Composite,
        }
    }

    /// True when the route takes this message.
    pub fn from(&self, source: &Source) -> bool {
        let dialect = self.dialect().filter(Topic::is_outbound);
        match source {
            Source::All => true,
            Source::Messages => dialect.is_some(),
            Source::AnyModule => dialect.is_some_and(|t| t.module().is_some()),
            Source::Module(m) => dialect.is_some_and(|t| t.module() == Some(m)),
            Source::ModuleOutputs(m) => dialect.is_some_and(|t| t.module() == Some(m)) && self.output().is_some(),
            Source::ModuleOutput(m, o) => {
                dialect.is_some_and(|t| t.module() == Some(m)) && self.output().as_deref() == Some(o)
            }
            Source::Topics(filter) => topic_matches(filter, self.msg.topic()),
        }
    }

    /// Evaluates `e`.
    pub fn eval<'s>(&'s self, e: &'s Expr) -> Value<'s> {
        match e {
            Expr::Lit(v) => v.reborrow(),
            Expr::Sys(s) => self.sys(*s),
            Expr::App(name) => self
                .prop(name)
                .map_or(Value::Undefined, |v| Value::Str(Cow::Borrowed(v))),
            Expr::Body(path) => self.body(path),
            Expr::Not(inner) => match self.eval(inner) {
                Value::Bool(b) => Value::Bool(!b),
                _ => Value::Undefined,
            },
            Expr::And(a, b) => match (self.eval(a), self.eval(b)) {
                (Value::Bool(false), _) | (_, Value::Bool(false)) => Value::Bool(false),
                (Value::Bool(true), Value::Bool(true)) => Value::Bool(true),
                _ => Value::Undefined,
            },
            Expr::Or(a, b) => match self.eval(a) {
                Value::Bool(true) => Value::Bool(true),
                left => match (left, self.eval(b)) {
                    (_, Value::Bool(true)) => Value::Bool(true),
                    (Value::Bool(false), Value::Bool(false)) => Value::Bool(false),
                    _ => Value::Undefined,
                },
            },
            Expr::Neg(inner) => match number(&self.eval(inner)) {
                Some(n) => Value::Num(-n),
                None => Value::Undefined,
            },
            Expr::Bin(op, a, b) => binary(*op, self.eval(a), self.eval(b)),
            Expr::Call(f, args) => {
                let args: Vec<Value<'s>> = args.iter().map(|a| self.eval(a)).collect();
                call(*f, &args)
            }
        }
    }

    /// True when `route` takes this message and its condition holds.
    pub fn matches(&self, route: &Route) -> bool {
        self.from(&route.source)
            && route
                .condition
                .as_ref()
                .is_none_or(|c| self.eval(c) == Value::Bool(true))
    }
}

fn number(v: &Value<'_>) -> Option<f64> {
    match v {
        Value::Num(n) => Some(*n),
        Value::Str(s) => s.trim().parse::<f64>().ok().filter(|n| n.is_finite()),
        _ => None,
    }
}

fn compare(a: &Value<'_>, b: &Value<'_>) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Value::Num(x), Value::Num(y)) => x.partial_cmp(y),
        (Value::Str(x), Value::Str(y)) => Some(x.cmp(y)),
        (Value::Num(_), Value::Str(_)) | (Value::Str(_), Value::Num(_)) => number(a)?.partial_cmp(&number(b)?),
        (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
        (Value::Null, Value::Null) => Some(std::cmp::Ordering::Equal),
        _ => None,
    }
}

fn binary<'v>(op: Op, a: Value<'v>, b: Value<'v>) -> Value<'v> {
    use std::cmp::Ordering::{Equal, Greater, Less};
    if a == Value::Undefined || b == Value::Undefined {
        return Value::Undefined;
    }
    let ordered = |want: &[std::cmp::Ordering]| match compare(&a, &b) {
        Some(o) => Value::Bool(want.contains(&o)),
        None => Value::Undefined,
    };
    let is_bool_or_null = |v: &Value<'_>| matches!(v, Value::Bool(_) | Value::Null);
    match op {
        Op::Eq => ordered(&[Equal]),
        Op::Ne => ordered(&[Less, Greater]),
        Op::Lt | Op::Le | Op::Gt | Op::Ge if is_bool_or_null(&a) || is_bool_or_null(&b) => Value::Undefined,
        Op::Lt => ordered(&[Less]),
        Op::Le => ordered(&[Less, Equal]),
        Op::Gt => ordered(&[Greater]),
        Op::Ge => ordered(&[Greater, Equal]),
        Op::Add | Op::Sub | Op::Mul | Op::Div | Op::Rem => {
            let (Some(x), Some(y)) = (number(&a), number(&b)) else {
                return Value::Undefined;
            };
            let r = match op {
                Op::Add => x + y,
                Op::Sub => x - y,
                Op::Mul => x * y,
                Op::Div if y != 0.0 => x / y,
                Op::Rem if y != 0.0 => x % y,
                _ => return Value::Undefined,
            };
            if r.is_finite() { Value::Num(r) } else { Value::Undefined }
        }
    }
}

fn text<'v>(v: &'v Value<'_>) -> Option<&'v str> {
    match v {
        Value::Str(s) => Some(s),
        _ => None,
    }
}

fn call<'v>(f: Func, args: &[Value<'v>]) -> Value<'v> {
    let is = |b: bool| Value::Bool(b);
    let s0 = args.first().and_then(text);
    let s1 = args.get(1).and_then(text);
    let str_fn = |g: &dyn Fn(&str) -> Value<'v>| s0.map_or(Value::Undefined, g);
    let two = |g: &dyn Fn(&str, &str) -> Value<'v>| match (s0, s1) {
        (Some(a), Some(b)) => g(a, b),
        _ => Value::Undefined,
    };
    let num_fn = |g: fn(f64) -> f64| match args.first() {
        Some(Value::Num(n)) => Value::Num(g(*n)),
        _ => Value::Undefined,
    };
    match f {
        Func::IsDefined => is(args[0] != Value::Undefined),
        Func::IsString => is(matches!(args[0], Value::Str(_))),
        Func::IsNumber => is(matches!(args[0], Value::Num(_))),
        Func::IsBool => is(matches!(args[0], Value::Bool(_))),
        Func::IsNull => is(args[0] == Value::Null),
        Func::Lower => str_fn(&|s| Value::Str(s.to_lowercase().into())),
        Func::Upper => str_fn(&|s| Value::Str(s.to_uppercase().into())),
        Func::Length => str_fn(&|s| Value::Num(s.chars().count() as f64)),
        Func::Ltrim => str_fn(&|s| Value::Str(s.trim_start().to_string().into())),
        Func::Rtrim => str_fn(&|s| Value::Str(s.trim_end().to_string().into())),
        Func::Trim => str_fn(&|s| Value::Str(s.trim().to_string().into())),
        Func::Concat => {
            let mut out = String::new();
            for a in args {
                match a {
                    Value::Str(s) => out.push_str(s),
                    Value::Num(n) => out.push_str(&n.to_string()),
                    _ => return Value::Undefined,
                }
            }
            Value::Str(out.into())
        }
        Func::Substring => {
            let start = args.get(1).and_then(number);
            let len = match args.get(2) {
                None => Some(f64::INFINITY),
                Some(v) => number(v),
            };
            match (s0, start, len) {
                (Some(s), Some(start), Some(len)) if start >= 0.0 && len >= 0.0 => {
                    let taken = if len.is_infinite() { usize::MAX } else { len as usize };
                    Value::Str(Cow::Owned(s.chars().skip(start as usize).take(taken).collect()))
                }
                _ => Value::Undefined,
            }
        }
        Func::IndexOf => two(&|s, sub| Value::Num(s.find(sub).map_or(-1.0, |byte| s[..byte].chars().count() as f64))),
        Func::StartsWith => two(&|s, p| is(s.starts_with(p))),
        Func::EndsWith => two(&|s, p| is(s.ends_with(p))),
        Func::Contains => two(&|s, p| is(s.contains(p))),
        Func::Abs => num_fn(f64::abs),
        Func::Floor => num_fn(f64::floor),
        Func::Ceiling => num_fn(f64::ceil),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(topic: &str, props: &[(&str, &str)], body: &str) -> Message<'static> {
        let mut b = Message::builder(topic).payload(body.as_bytes().to_vec());
        for (k, v) in props {
            b = b.property(*k, *v);
        }
        b.build()
    }

    fn holds(cond: &str, m: &Message<'_>) -> bool {
        let r = parse(&format!("FROM /* WHERE {cond} INTO $upstream")).unwrap_or_else(|e| panic!("{cond}: {e}"));
        View::new(m).matches(&r)
    }

    #[test]
    fn conditions_cover_properties_body_and_functions() {
        let m = msg(
            "devices/d1/messages/events/",
            &[
                ("$.ct", "application/json"),
                ("$.mid", "m-1"),
                ("temperature", "35"),
                ("site", "Plant 7"),
            ],
            r#"{"temp": {"value": 21.5, "unit": "C"}, "tags": ["a", "b"], "list": [{}, {"k": 2}], "ok": true, "none": null}"#,
        );
        let yes = [
            "temperature > 30",
            "temperature = 35 AND site = 'Plant 7'",
            "$contentType = 'application/json'",
            "$messageId = \"m-1\"",
            "$connectionDeviceId = 'd1'",
            "$body.temp.value >= 21.5 AND $body.temp.unit = 'C'",
            "$body.tags.1 = 'b' AND $body.list.1.k = 2",
            "$body.ok = true",
            "IS_NULL($body.none)",
            "NOT IS_DEFINED($body.missing)",
            "NOT (temperature < 30)",
            "temperature < 30 OR site <> 'x'",
            "LOWER(site) = 'plant 7' AND UPPER(site) = 'PLANT 7'",
            "LENGTH(site) = 7 AND STARTS_WITH(site, 'Pla') AND ENDS_WITH(site, ' 7') AND CONTAINS(site, 'ant')",
            "SUBSTRING(site, 6) = '7' AND SUBSTRING(site, 0, 5) = 'Plant' AND INDEX_OF(site, 't') = 4",
            "CONCAT(site, '-', 1) = 'Plant 7-1'",
            "temperature * 2 - 10 = 60 AND temperature % 10 = 5 AND -temperature = -35",
            "ABS(-2) = 2 AND FLOOR(2.7) = 2 AND CEILING(2.1) = 3",
            "[site] = 'Plant 7'",
            "$topic = 'devices/d1/messages/events/'",
            "TRIM('  x ') = 'x' AND LTRIM(' x') = 'x' AND RTRIM('x ') = 'x'",
            "1e3 = 1000 AND .5 = 0.5",
            "'it''s' = \"it's\"",
        ];
        for c in yes {
            assert!(holds(c, &m), "{c} should hold");
        }
        let no = [
            "temperature > 40",
            "missing = 1",
            "NOT missing = 1",
            "missing = 1 OR false",
            "site > 3",
            "$body.ok > false",
            "$connectionModuleId = 'x'",
            "1 / 0 = 1",
            "IS_STRING($body.temp)",
        ];
        for c in no {
            assert!(!holds(c, &m), "{c} should not hold");
        }
        // Three-valued logic: undefined OR true is true; undefined AND false is false.
        assert!(holds("missing = 1 OR true", &m));
        assert!(holds("NOT (missing = 1 AND false)", &m));
        // A body that is not JSON leaves body fields undefined.
        assert!(holds("NOT IS_DEFINED($body.x)", &msg("a", &[], "not json")));
    }

    #[test]
    fn sources_classify_dialect_and_plain_topics() {
        let dev = msg("devices/d/messages/events/a=1", &[], "");
        let modm = msg("devices/d/modules/m/messages/events/", &[("$.on", "out1")], "");
        let out = msg("devices/d/modules/m/outputs/o2", &[], "");
        let plain = msg("plant/7/temp", &[], "");
        let src = |s: &str| parse(&format!("FROM {s} INTO $upstream")).unwrap().source;
        let table: [(&str, [bool; 4]); 8] = [
            ("/*", [true, true, true, true]),
            ("/messages/*", [true, true, true, false]),
            ("/messages/modules/*", [false, true, true, false]),
            ("/messages/modules/m/*", [false, true, true, false]),
            ("/messages/modules/m/outputs/*", [false, true, true, false]),
            ("/messages/modules/m/outputs/out1", [false, true, false, false]),
            ("/messages/modules/m/outputs/o2", [false, false, true, false]),
            ("/topics/plant/+/temp", [false, false, false, true]),
        ];
        for (s, want) in table {
            let got: Vec<bool> = [&dev, &modm, &out, &plain]
                .iter()
                .map(|m| View::new(m).from(&src(s)))
                .collect();
            assert_eq!(got, want, "{s}");
        }
        assert_eq!(View::new(&modm).sys(Sys::OutputName), Value::Str("out1".into()));
    }

    #[test]
    fn sinks_parse() {
        let sink = |s: &str| parse(&format!("FROM /* INTO {s}")).map(|r| r.sink);
        assert_eq!(sink("$upstream"), Ok(Sink::Upstream));
        assert_eq!(sink("$Local"), Ok(Sink::Local));
        assert_eq!(
            sink("BrokeredEndpoint(\"/modules/filter/inputs/in1\")"),
            Ok(Sink::Input {
                device: None,
                module: "filter".into(),
                input: "in1".into()
            })
        );
        assert_eq!(
            sink("brokeredendpoint('/devices/gw/modules/f/inputs/i')"),
            Ok(Sink::Input {
                device: Some("gw".into()),
                module: "f".into(),
                input: "i".into()
            })
        );
        assert_eq!(sink("topic('alerts/all')"), Ok(Sink::Topic("alerts/all".into())));
    }

    use proptest::prelude::*;

    /// Route-like text: keywords, operators, names, quotes and noise.
    fn route_text() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("FROM ".to_string()),
            Just("/messages/* ".to_string()),
            Just("/topics/a/+ ".to_string()),
            Just(" WHERE ".to_string()),
            Just(" INTO $upstream".to_string()),
            Just(" AND ".to_string()),
            Just(" OR ".to_string()),
            Just("NOT ".to_string()),
            Just("(".to_string()),
            Just(")".to_string()),
            Just("$body.a.0".to_string()),
            Just("SUBSTRING(".to_string()),
            Just(",".to_string()),
            Just("'".to_string()),
            Just("\"".to_string()),
            Just("[".to_string()),
            Just("-".to_string()),
            Just(".5e".to_string()),
            "[=<>!+*/%]{1,2}",
            "[a-zA-Z_$]{1,8}",
            "[0-9.]{1,6}",
            any::<char>().prop_map(|c| c.to_string()),
        ];
        proptest::collection::vec(piece, 0..24).prop_map(|v| v.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any text either parses or is refused with a column inside it (or
        /// just past its end); a route that parses evaluates without panicking.
        #[test]
        fn parsing_and_evaluating_never_panic(text in route_text(), body in "[ -~]{0,40}", prop in "[ -~]{0,12}") {
            match parse(&text) {
                Ok(route) => {
                    let m = msg("devices/d/messages/events/", &[("a", &prop), ("$.ct", "application/json")], &body);
                    let _ = View::new(&m).matches(&route);
                }
                Err(e) => prop_assert!(e.column >= 1 && e.column <= text.chars().count() + 1, "{e} in {text:?}"),
            }
        }

        /// Bags survive encoding, and any text either parses as a bag or is refused.
        #[test]
        fn property_bags_round_trip(pairs in proptest::collection::vec(("\\PC{1,8}", "\\PC{0,8}"), 0..6), raw in "\\PC{0,40}") {
            prop_assert_eq!(iothub::parse_bag(&iothub::encode_bag(&pairs)).unwrap(), pairs);
            let _ = iothub::parse_bag(&raw);
        }
    }

    #[test]
    fn bad_routes_name_the_column_and_the_reason() {
        let cases = [
            ("SELECT * INTO $upstream", 1, "a route starts with FROM"),
            ("FROM /messages INTO $upstream", 6, "unknown source `/messages`"),
            ("FROM /topics/a/#/b INTO $upstream", 6, "`#` must be a whole last level"),
            ("FROM /* WHER x = 1 INTO $upstream", 9, "expected WHERE or INTO"),
            (
                "FROM /* WHERE x = INTO $upstream",
                19,
                "expected a value, found keyword INTO",
            ),
            ("FROM /* WHERE x = 'abc INTO $upstream", 19, "no closing quote"),
            ("FROM /* WHERE (x = 1 INTO $upstream", 22, "expected `)`"),
            ("FROM /* WHERE x = 1", 20, "expected INTO or an operator, found the end"),
            (
                "FROM /* WHERE $nope = 1 INTO $upstream",
                15,
                "unknown system property `$nope`",
            ),
            (
                "FROM /* WHERE LOWR(x) = 'a' INTO $upstream",
                15,
                "unknown function `LOWR`",
            ),
            (
                "FROM /* WHERE LOWER(x, y) = 'a' INTO $upstream",
                15,
                "LOWER takes 1 argument(s), got 2",
            ),
            ("FROM /* WHERE x # 1 INTO $upstream", 17, "unexpected character `#`"),
            ("FROM /* INTO $cloud", 14, "expected a sink"),
            (
                "FROM /* INTO BrokeredEndpoint(\"/modules/m\")",
                31,
                "BrokeredEndpoint takes",
            ),
            ("FROM /* INTO topic('a/+')", 20, "without wildcards"),
            ("FROM /* INTO $upstream extra", 24, "unexpected `extra` after the sink"),
            (
                "FROM /* WHERE x = 1 2 INTO $upstream",
                21,
                "expected INTO or an operator, found number 2",
            ),
        ];
        for (text, column, reason) in cases {
            let e = parse(text).err().unwrap_or_else(|| panic!("{text} accepted"));
            assert!(e.reason.contains(reason), "{text}: {e}");
            assert_eq!(e.column, column, "{text}: {e}");
        }
        let deep = format!(
            "FROM /* WHERE {}x = 1{} INTO $upstream",
            "(".repeat(100),
            ")".repeat(100)
        );
        assert!(parse(&deep).unwrap_err().reason.contains("deeper than"));
        let nots = format!("FROM /* WHERE {} x = 1 INTO $upstream", "NOT ".repeat(100));
        assert!(parse(&nots).unwrap_err().reason.contains("deeper than"));
    }
}
