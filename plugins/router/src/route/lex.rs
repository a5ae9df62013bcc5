//! The route language's tokens.

use std::fmt;

use super::{Op, RouteError, err};

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Tok {
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

pub(super) struct Lexer {
    chars: Vec<char>,
    pos: usize,
    peeked: Option<(usize, Tok)>,
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '-'
}

impl Lexer {
    pub(super) fn new(text: &str) -> Lexer {
        Lexer {
            chars: text.chars().collect(),
            pos: 0,
            peeked: None,
        }
    }

    pub(super) fn skip_ws(&mut self) {
        while self.chars.get(self.pos).is_some_and(|c| c.is_whitespace()) {
            self.pos += 1;
        }
    }

    /// The 1-based column of the next token.
    pub(super) fn column(&mut self) -> usize {
        if let Some((col, _)) = &self.peeked {
            return *col;
        }
        self.skip_ws();
        self.pos + 1
    }

    /// Everything up to the next whitespace (the source path).
    pub(super) fn raw_word(&mut self) -> (usize, String) {
        self.skip_ws();
        let start = self.pos;
        while self.chars.get(self.pos).is_some_and(|c| !c.is_whitespace()) {
            self.pos += 1;
        }
        (start + 1, self.chars[start..self.pos].iter().collect())
    }

    pub(super) fn peek(&mut self) -> Result<&Tok, RouteError> {
        let t = match self.peeked.take() {
            Some(t) => t,
            None => self.lex()?,
        };
        Ok(&self.peeked.insert(t).1)
    }

    pub(super) fn next(&mut self) -> Result<(usize, Tok), RouteError> {
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

pub(super) fn keyword(t: &Tok, k: &str) -> bool {
    matches!(t, Tok::Word(w) if w.eq_ignore_ascii_case(k))
}

// --------------------------------------------------------------- parsing
