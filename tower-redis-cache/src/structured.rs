//! Structured Field dictionaries (RFC 8941 §4.2.2), as targeted cache control (RFC 9213) needs them.
//!
//! The whole field is validated with the RFC's parsing algorithm: a field that fails anywhere is `None`, so the
//! caller ignores it as a whole. Bare items are kept; parameters and inner lists are checked and dropped, since no
//! cache directive uses them. When a key appears twice, the last one wins (§4.2.2).

/// A dictionary member's value, as far as cache directives read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Value {
    Integer(i64),
    /// A decimal, a token or a byte sequence: valid, but no cache directive takes one.
    Other,
    String(String),
    Boolean(bool),
    /// An inner list: valid, but no cache directive takes one.
    InnerList,
}

/// The members of a dictionary in order, each key once (the last value given for it).
pub(crate) fn parse_dictionary(input: &str) -> Option<Vec<(String, Value)>> {
    let mut parser = Parser {
        bytes: input.as_bytes(),
        at: 0,
    };
    parser.skip_sp();
    let mut members: Vec<(String, Value)> = Vec::new();
    while !parser.done() {
        let key = parser.key()?;
        let value = if parser.eat(b'=') {
            if parser.peek() == Some(b'(') {
                parser.inner_list()?;
                Value::InnerList
            } else {
                parser.item()?
            }
        } else {
            parser.parameters()?;
            Value::Boolean(true)
        };
        members.retain(|(existing, _)| *existing != key);
        members.push((key, value));
        parser.skip_ows();
        if parser.done() {
            break;
        }
        if !parser.eat(b',') {
            return None;
        }
        parser.skip_ows();
        if parser.done() {
            return None; // a trailing comma
        }
    }
    Some(members)
}

struct Parser<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn done(&self) -> bool {
        self.at >= self.bytes.len()
    }

    fn eat(&mut self, byte: u8) -> bool {
        let matched = self.peek() == Some(byte);
        if matched {
            self.at += 1;
        }
        matched
    }

    fn skip_sp(&mut self) {
        while self.eat(b' ') {}
    }

    fn skip_ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.at += 1;
        }
    }

    /// `key = ( lcalpha / "*" ) *( lcalpha / DIGIT / "_" / "-" / "." / "*" )`
    fn key(&mut self) -> Option<String> {
        let start = self.at;
        if !matches!(self.peek(), Some(b'a'..=b'z' | b'*')) {
            return None;
        }
        while matches!(
            self.peek(),
            Some(b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' | b'*')
        ) {
            self.at += 1;
        }
        Some(String::from_utf8_lossy(&self.bytes[start..self.at]).into_owned())
    }

    /// A bare item and its parameters.
    fn item(&mut self) -> Option<Value> {
        let value = self.bare_item()?;
        self.parameters()?;
        Some(value)
    }

    /// `*( ";" *SP key [ "=" bare-item ] )`, checked and dropped.
    fn parameters(&mut self) -> Option<()> {
        while self.eat(b';') {
            self.skip_sp();
            self.key()?;
            if self.eat(b'=') {
                self.bare_item()?;
            }
        }
        Some(())
    }

    /// `"(" *SP [ item *( 1*SP item ) *SP ] ")" parameters`, checked and dropped.
    fn inner_list(&mut self) -> Option<()> {
        if !self.eat(b'(') {
            return None;
        }
        loop {
            self.skip_sp();
            if self.eat(b')') {
                return self.parameters();
            }
            self.item()?;
            if !matches!(self.peek(), Some(b' ' | b')')) {
                return None;
            }
        }
    }

    fn bare_item(&mut self) -> Option<Value> {
        match self.peek()? {
            b'-' | b'0'..=b'9' => self.number(),
            b'"' => self.string().map(Value::String),
            b':' => self.byte_sequence().map(|()| Value::Other),
            b'?' => self.boolean().map(Value::Boolean),
            b'A'..=b'Z' | b'a'..=b'z' | b'*' => {
                self.token();
                Some(Value::Other)
            }
            _ => None,
        }
    }

    /// An integer of at most 15 digits, or a decimal of at most 12 digits before the point and 1 to 3 after.
    fn number(&mut self) -> Option<Value> {
        let negative = self.eat(b'-');
        let start = self.at;
        let mut point = None;
        while let Some(byte) = self.peek() {
            match byte {
                b'0'..=b'9' => {}
                b'.' if point.is_none() => {
                    if self.at - start > 12 {
                        return None;
                    }
                    point = Some(self.at);
                }
                _ => break,
            }
            self.at += 1;
            let length = self.at - start;
            if (point.is_none() && length > 15) || (point.is_some() && length > 16) {
                return None;
            }
        }
        let digits = std::str::from_utf8(&self.bytes[start..self.at]).ok()?;
        match point {
            None => {
                let magnitude: i64 = digits.parse().ok()?;
                Some(Value::Integer(if negative {
                    -magnitude
                } else {
                    magnitude
                }))
            }
            Some(point) => {
                let fraction = self.at - point - 1;
                if point == start || !(1..=3).contains(&fraction) {
                    return None;
                }
                Some(Value::Other)
            }
        }
    }

    /// `DQUOTE *( unescaped / "\" ( DQUOTE / "\" ) ) DQUOTE`, printable ASCII only.
    fn string(&mut self) -> Option<String> {
        if !self.eat(b'"') {
            return None;
        }
        let mut out = String::new();
        loop {
            let byte = self.peek()?;
            self.at += 1;
            match byte {
                b'\\' => {
                    let escaped = self.peek()?;
                    if escaped != b'"' && escaped != b'\\' {
                        return None;
                    }
                    self.at += 1;
                    out.push(char::from(escaped));
                }
                b'"' => return Some(out),
                0x20..=0x7e => out.push(char::from(byte)),
                _ => return None,
            }
        }
    }

    /// `( ALPHA / "*" ) *( tchar / ":" / "/" )`
    fn token(&mut self) {
        self.at += 1;
        while let Some(byte) = self.peek() {
            let tchar = byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:/".contains(&byte);
            if !tchar {
                break;
            }
            self.at += 1;
        }
    }

    /// `":" *base64 ":"`
    fn byte_sequence(&mut self) -> Option<()> {
        if !self.eat(b':') {
            return None;
        }
        loop {
            match self.peek()? {
                b':' => {
                    self.at += 1;
                    return Some(());
                }
                byte if byte.is_ascii_alphanumeric() || b"+/=".contains(&byte) => self.at += 1,
                _ => return None,
            }
        }
    }

    /// `"?" ( "0" / "1" )`
    fn boolean(&mut self) -> Option<bool> {
        if !self.eat(b'?') {
            return None;
        }
        let value = match self.peek()? {
            b'0' => false,
            b'1' => true,
            _ => return None,
        };
        self.at += 1;
        Some(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(input: &str) -> Vec<(String, Value)> {
        parse_dictionary(input).unwrap_or_else(|| panic!("{input:?} should parse"))
    }

    #[test]
    fn reads_cache_directives_as_a_dictionary() {
        assert_eq!(
            members("max-age=60, no-store, private=\"set-cookie\", x=?0"),
            [
                ("max-age".to_owned(), Value::Integer(60)),
                ("no-store".to_owned(), Value::Boolean(true)),
                ("private".to_owned(), Value::String("set-cookie".to_owned())),
                ("x".to_owned(), Value::Boolean(false)),
            ]
        );
        assert_eq!(members(""), []);
        assert_eq!(members("   "), []);
    }

    #[test]
    fn the_last_of_two_keys_wins_and_parameters_are_dropped() {
        assert_eq!(
            members("max-age=60;a=1;b, max-age=10, none"),
            [
                ("max-age".to_owned(), Value::Integer(10)),
                ("none".to_owned(), Value::Boolean(true)),
            ]
        );
    }

    #[test]
    fn every_kind_of_item_is_valid_but_only_some_are_kept() {
        assert_eq!(
            members("a=1.5, b=tok/en:x, c=:aGk=:, d=(1 \"x\";p), e=-3, f=\"q\\\"s\""),
            [
                ("a".to_owned(), Value::Other),
                ("b".to_owned(), Value::Other),
                ("c".to_owned(), Value::Other),
                ("d".to_owned(), Value::InnerList),
                ("e".to_owned(), Value::Integer(-3)),
                ("f".to_owned(), Value::String("q\"s".to_owned())),
            ]
        );
        assert_eq!(
            members("a=123456789012345")[0].1,
            Value::Integer(123_456_789_012_345)
        );
        assert_eq!(members("a=123456789012.123")[0].1, Value::Other);
    }

    #[test]
    fn an_invalid_field_fails_as_a_whole() {
        for input in [
            "Max-Age=60",               // keys are lower case
            "max-age=60,",              // trailing comma
            "max-age=60 no-store",      // a missing comma
            "max-age=",                 // no value
            "max-age=1234567890123456", // 16 digits
            "a=1.",                     // a decimal with no fraction
            "a=1.1234",                 // four fraction digits
            "a=1234567890123.1",        // 13 integer digits
            "a=\"unterminated",
            "a=\"bad \\x escape\"",
            "a=?2",
            "a=:not base64!:",
            "a=(1 2",
            "a=(1,2)",
            "a=@1659578233", // a date (RFC 9651), not in RFC 8941
            ",a",
            "a;=1",
        ] {
            assert!(parse_dictionary(input).is_none(), "{input:?} should fail");
        }
    }

    #[test]
    fn whitespace_around_members_is_allowed_and_tabs_only_between_them() {
        assert_eq!(members("  a=1 ,\tb").len(), 2);
        assert!(parse_dictionary("\ta").is_none());
    }
}
