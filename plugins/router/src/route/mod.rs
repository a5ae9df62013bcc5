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
//!
//! The modules: [`lex`] turns the text into tokens, [`parse`] the tokens
//! into a [`Route`], and [`eval`] evaluates a route's condition against a
//! message through a [`View`].

use std::borrow::Cow;
use std::fmt;

mod eval;
mod lex;
mod parse;

pub use eval::View;
pub use parse::{check_filter, parse};

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

/// An error at `column`.
pub(crate) fn err<T>(column: usize, reason: impl Into<String>) -> Result<T, RouteError> {
    Err(RouteError {
        column,
        reason: reason.into(),
    })
}

#[cfg(test)]
mod tests;
