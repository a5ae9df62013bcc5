//! A route's condition against a message: values, operators, functions.

use std::borrow::Cow;
use std::cell::OnceCell;

use holdfast_sdk::iothub::{self, Topic, system};
use holdfast_sdk::router::{Message, topic_matches};

use super::{Expr, Func, Op, Route, Source, Sys, Value};

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

    pub(super) fn sys<'s>(&'s self, s: Sys) -> Value<'s> {
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
