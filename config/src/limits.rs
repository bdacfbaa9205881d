//! Bounds on what loading a configuration may read and parse, so that a mistaken or
//! hostile file is refused in milliseconds instead of hanging or exhausting memory:
//! only regular files are read, each up to a size limit, `${...}` references may only
//! add so much text, and the nesting depth is checked before the YAML parser (whose
//! time grows with the square of the depth of flow collections) sees the text.
use std::{
    fs::{File, FileType, OpenOptions},
    io::{self, Read},
    path::Path,
};

/// The largest `--config` file, checked before anything is parsed.
pub const MAX_CONFIG_FILE_SIZE: u64 = 4 << 20;

/// The largest file a `${file:PATH}` reference may read.
pub const MAX_REFERENCED_FILE_SIZE: u64 = 1 << 20;

/// The most text all `${...}` references of one configuration may substitute together.
pub const MAX_EXPANDED_SIZE: u64 = 16 << 20;

/// The deepest nesting of mappings and sequences in a config file (or in the text of a
/// `${...}` reference parsed as YAML).
pub const MAX_NESTING_DEPTH: usize = 64;

/// `4 MiB`, `512 KiB` or `100 bytes`.
pub fn show_size(bytes: u64) -> String {
    match bytes {
        0 => "0 bytes".to_owned(),
        b if b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} bytes"),
    }
}

/// Opening a FIFO for reading waits for a writer unless O_NONBLOCK is given; for a
/// regular file the flag changes nothing.
#[cfg(unix)]
const O_NONBLOCK: i32 = libc::O_NONBLOCK;

/// Reads `path` as UTF-8 text if it is a regular file of at most `limit` bytes; `what`
/// names the limit in the error (`a config file`).
///
/// FIFOs, devices, sockets and directories are refused: the path is looked at before it
/// is opened (opening a FIFO or a device can block or have effects), and the file is
/// looked at again once open, so that a path swapped in between is refused too. At most
/// `limit + 1` bytes are read, so a file that grows while it is read cannot exceed it.
pub fn read_regular_file(path: &Path, limit: u64, what: &str) -> io::Result<String> {
    ensure_regular(std::fs::metadata(path)?.file_type())?;
    let file = open_for_reading(path)?;
    let metadata = file.metadata()?;
    ensure_regular(metadata.file_type())?;
    let too_large = || {
        io::Error::new(
            io::ErrorKind::FileTooLarge,
            format!("larger than the {} limit for {what}", show_size(limit)),
        )
    };
    if metadata.len() > limit {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(too_large());
    }
    String::from_utf8(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "stream did not contain valid UTF-8",
        )
    })
}

fn open_for_reading(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(O_NONBLOCK);
    }
    options.open(path)
}

fn ensure_regular(kind: FileType) -> io::Result<()> {
    if kind.is_file() {
        return Ok(());
    }
    let message = match describe(kind) {
        Some(what) => format!("not a regular file (it is {what})"),
        None => "not a regular file".to_owned(),
    };
    Err(io::Error::new(io::ErrorKind::InvalidInput, message))
}

fn describe(kind: FileType) -> Option<&'static str> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if kind.is_fifo() {
            return Some("a FIFO");
        } else if kind.is_char_device() {
            return Some("a character device");
        } else if kind.is_block_device() {
            return Some("a block device");
        } else if kind.is_socket() {
            return Some("a socket");
        }
    }
    kind.is_dir().then_some("a directory")
}

/// The deepest nesting of mappings and sequences in a YAML text, found in one pass
/// without parsing it, or the 1-based line and column of the collection that opens
/// level `limit + 1`.
///
/// This follows libyaml's scanner far enough to see every collection it would open:
/// block mappings and sequences by the column of their keys and `- ` entries, flow
/// collections by their brackets, outside quoted, plain and block scalars and comments.
/// Where the text is ambiguous or not valid YAML it counts more levels, never fewer.
pub fn nesting_depth(text: &str, limit: usize) -> Result<usize, (usize, usize)> {
    let mut scan = Nesting {
        limit,
        max: 0,
        line: 0,
        blocks: Vec::new(),
        flows: Vec::new(),
        pairs: 0,
        mode: Mode::Token,
        block_scalar: None,
        key_column: None,
        key_peak: 0,
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    // libyaml's line breaks: LF, CRLF, CR, NEL, LS and PS.
    let mut start = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        if matches!(c, '\n' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}') {
            scan.line(&text[start..at])?;
            if c == '\r' && chars.peek().is_some_and(|&(_, next)| next == '\n') {
                chars.next();
                start = at + 2;
            } else {
                start = at + c.len_utf8();
            }
        }
    }
    scan.line(&text[start..])?;
    Ok(scan.max)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Block {
    Map,
    Seq,
}

/// An open flow collection.
struct Flow {
    sequence: bool,
    /// The current entry of a sequence is a single-pair mapping (`[a: b]`): one level
    /// more.
    pair: bool,
    /// The deepest level reached inside the current entry: if it turns out to be the
    /// key of a single pair, all of it is one level deeper.
    entry_peak: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Between tokens: the next character starts one.
    Token,
    /// Inside a plain (unquoted) scalar, which may go on over several lines.
    Plain,
    /// Inside a quoted scalar that goes on past the end of the line.
    Quoted(u8),
}

/// The content lines of a `|` or `>` scalar: those indented at least `indent`, which
/// is given by the header or taken from the first non-empty line.
struct BlockScalar {
    indent: Option<usize>,
    least: usize,
    blank_width: usize,
}

struct Nesting {
    limit: usize,
    max: usize,
    /// 1-based number of the line being scanned.
    line: usize,
    /// Open block collections: their column and kind.
    blocks: Vec<(usize, Block)>,
    flows: Vec<Flow>,
    /// How many of `flows` are sequences whose current entry is a single-pair mapping.
    pairs: usize,
    mode: Mode,
    block_scalar: Option<BlockScalar>,
    /// Where the first token of a block node on the current line starts: a mapping
    /// opened by a `:` later on the line starts there, with that token as its key.
    key_column: Option<usize>,
    /// How many flow levels that token reached: they end up inside the mapping.
    key_peak: usize,
}

fn is_blank(b: Option<&u8>) -> bool {
    matches!(b, None | Some(b' ' | b'\t'))
}

fn is_flow_indicator(b: u8) -> bool {
    matches!(b, b',' | b'[' | b']' | b'{' | b'}')
}

/// `---` or `...` at the start of a line: a document boundary.
fn is_document_marker(b: &[u8]) -> bool {
    (b.starts_with(b"---") || b.starts_with(b"...")) && is_blank(b.get(3))
}

/// The index just past the quote that closes a scalar opened by `quote`, if it is on
/// this line.
fn close_quote(b: &[u8], from: usize, quote: u8) -> Option<usize> {
    let mut i = from;
    while i < b.len() {
        match b[i] {
            b'\\' if quote == b'"' => i += 2,
            c if c == quote => {
                if quote == b'\'' && b.get(i + 1) == Some(&b'\'') {
                    i += 2;
                } else {
                    return Some(i + 1);
                }
            }
            _ => i += 1,
        }
    }
    None
}

impl Nesting {
    fn depth(&self) -> usize {
        self.blocks.len() + self.flows.len() + self.pairs
    }

    /// Level `depth` was reached by a collection opened at byte `at` of `line`.
    fn reached(&mut self, line: &str, at: usize, depth: usize) -> Result<(), (usize, usize)> {
        self.max = self.max.max(depth);
        for flow in &mut self.flows {
            flow.entry_peak = flow.entry_peak.max(depth);
        }
        if self.key_column.is_some() {
            self.key_peak = self.key_peak.max(depth.saturating_sub(self.blocks.len()));
        }
        if depth > self.limit {
            return Err((self.line, line[..at].chars().count() + 1));
        }
        Ok(())
    }

    /// A block mapping key or sequence entry at `column`: the collection it belongs to
    /// goes on, or a new one opens (its depth plus `inside`, the levels already seen
    /// inside it).
    fn block(
        &mut self,
        line: &str,
        column: usize,
        kind: Block,
        inside: usize,
    ) -> Result<(), (usize, usize)> {
        match self.blocks.last() {
            Some(&(c, k)) if c == column && k == kind => Ok(()),
            // A key at the column of a sequence written under a key at that same column
            // (`key:` then `- item`): the sequence has ended.
            Some(&(c, Block::Seq)) if c == column => {
                self.blocks.pop();
                self.block(line, column, kind, inside)
            }
            _ => {
                self.blocks.push((column, kind));
                self.reached(line, column, self.blocks.len() + inside)
            }
        }
    }

    fn parent_column(&self) -> isize {
        self.blocks.last().map_or(-1, |&(c, _)| c as isize)
    }

    fn line(&mut self, line: &str) -> Result<(), (usize, usize)> {
        self.line += 1;
        let b = line.as_bytes();
        let indent = b.iter().take_while(|&&c| c == b' ').count();
        let rest = &b[indent..];
        let blank = rest.iter().all(|&c| c == b' ' || c == b'\t');
        if let Some(scalar) = &mut self.block_scalar {
            if rest.is_empty() {
                scalar.blank_width = scalar.blank_width.max(indent);
                return Ok(());
            }
            let needed = *scalar
                .indent
                .get_or_insert(scalar.blank_width.max(indent).max(scalar.least));
            if indent >= needed {
                return Ok(());
            }
            self.block_scalar = None;
        }
        match self.mode {
            Mode::Quoted(quote) => {
                let Some(end) = close_quote(b, 0, quote) else {
                    return Ok(());
                };
                self.mode = Mode::Token;
                return self.scan(line, end);
            }
            Mode::Plain if self.flows.is_empty() => {
                if blank {
                    return Ok(());
                }
                // A plain scalar goes on over lines indented more than its collection.
                if indent as isize > self.parent_column()
                    && rest[0] != b'#'
                    && !is_document_marker(b)
                {
                    return self.scan(line, indent);
                }
                self.mode = Mode::Token;
            }
            _ => {}
        }
        if !self.flows.is_empty() {
            return self.scan(line, 0);
        }
        if blank || rest[0] == b'#' || b.first() == Some(&b'%') {
            return Ok(());
        }
        if is_document_marker(b) {
            self.blocks.clear();
            return self.scan(line, 3);
        }
        while self.blocks.last().is_some_and(|&(c, _)| c > indent) {
            self.blocks.pop();
        }
        self.scan(line, indent)
    }

    /// Scans `line` from byte `from`, in the current mode.
    fn scan(&mut self, line: &str, from: usize) -> Result<(), (usize, usize)> {
        let b = line.as_bytes();
        let mut i = from;
        // Preceded by whitespace (a line break counts).
        let mut spaced = true;
        self.key_column = None;
        self.key_peak = 0;
        while i < b.len() {
            let c = b[i];
            if c == b' ' || c == b'\t' {
                spaced = true;
                i += 1;
                continue;
            }
            let in_flow = !self.flows.is_empty();
            let blank_next = is_blank(b.get(i + 1));
            if self.mode == Mode::Plain {
                let ends = (c == b'#' && spaced)
                    || (c == b':' && (blank_next || in_flow && is_flow_indicator(b[i + 1])))
                    || (in_flow && is_flow_indicator(c));
                if !ends {
                    spaced = false;
                    i += 1;
                    continue;
                }
                self.mode = Mode::Token;
            }
            spaced = false;
            let indicator = match c {
                b'#' => true,
                b'-' => blank_next && !in_flow,
                b'?' | b':' => blank_next || in_flow,
                b'|' | b'>' => !in_flow,
                _ => false,
            };
            if !in_flow && !indicator && self.key_column.is_none() {
                self.key_column = Some(i);
            }
            match c {
                b'#' => return Ok(()),
                b'[' | b'{' => {
                    self.flows.push(Flow {
                        sequence: c == b'[',
                        pair: false,
                        entry_peak: 0,
                    });
                    self.reached(line, i, self.depth())?;
                    i += 1;
                }
                b']' | b'}' => {
                    if self.flows.pop().is_some_and(|flow| flow.pair) {
                        self.pairs -= 1;
                    }
                    i += 1;
                }
                b',' => {
                    if let Some(flow) = self.flows.last_mut() {
                        if flow.pair {
                            flow.pair = false;
                            self.pairs -= 1;
                        }
                        flow.entry_peak = 0;
                    }
                    i += 1;
                }
                b'-' if indicator => {
                    self.key_column = None;
                    self.key_peak = 0;
                    self.block(line, i, Block::Seq, 0)?;
                    i += 1;
                }
                b'?' | b':' if indicator => {
                    if in_flow {
                        let mut key_peak = None;
                        if let Some(flow) = self.flows.last_mut() {
                            if flow.sequence && !flow.pair {
                                flow.pair = true;
                                key_peak = Some(flow.entry_peak);
                            }
                        }
                        if let Some(key_peak) = key_peak {
                            self.pairs += 1;
                            let depth = self.depth().max(key_peak + 1);
                            self.reached(line, i, depth)?;
                        }
                    } else {
                        let column = match c {
                            b':' => self.key_column.take().unwrap_or(i),
                            _ => i,
                        };
                        self.key_column = None;
                        let inside = std::mem::take(&mut self.key_peak);
                        self.block(line, column, Block::Map, inside)?;
                    }
                    i += 1;
                }
                b'*' | b'&' | b'!' => {
                    i += 1;
                    while i < b.len() {
                        let n = b[i];
                        let name = if c == b'!' {
                            !(n == b' ' || n == b'\t' || in_flow && is_flow_indicator(n))
                        } else {
                            n.is_ascii_alphanumeric() || n == b'-' || n == b'_'
                        };
                        if !name {
                            break;
                        }
                        i += 1;
                    }
                }
                b'|' | b'>' if indicator => {
                    let parent = self.parent_column();
                    let explicit = b[i + 1..]
                        .iter()
                        .take_while(|&&h| h == b'+' || h == b'-' || h.is_ascii_digit())
                        .find(|h| h.is_ascii_digit())
                        .map(|h| usize::from(h - b'0'));
                    self.block_scalar = Some(BlockScalar {
                        indent: explicit.map(|m| (parent.max(0) as usize) + m),
                        least: (parent + 1).max(1) as usize,
                        blank_width: 0,
                    });
                    return Ok(());
                }
                b'\'' | b'"' => match close_quote(b, i + 1, c) {
                    Some(end) => i = end,
                    None => {
                        self.mode = Mode::Quoted(c);
                        return Ok(());
                    }
                },
                _ => {
                    self.mode = Mode::Plain;
                    i += 1;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_norway::Value;

    /// The nesting of a parsed value: collections inside collections.
    fn value_depth(value: &Value) -> usize {
        match value {
            Value::Mapping(map) => {
                1 + map
                    .iter()
                    .map(|(k, v)| value_depth(k).max(value_depth(v)))
                    .max()
                    .unwrap_or(0)
            }
            Value::Sequence(items) => 1 + items.iter().map(value_depth).max().unwrap_or(0),
            Value::Tagged(tagged) => value_depth(&tagged.value),
            _ => 0,
        }
    }

    fn depth(text: &str) -> usize {
        nesting_depth(text, usize::MAX).unwrap()
    }

    #[test]
    fn counts_what_the_parser_nests() {
        let documents = [
            "",
            "# only a comment\n",
            "plain scalar\n",
            "a: 1\n",
            "a:\n  b:\n    c: [1, {d: e}]\n",
            "a:\n- x\n- y\nb: 2\n",
            "- - - x\n  - y\n- z\n",
            "- a: 1\n  b:\n    - c\n",
            "[a: b, c]\n",
            "{a: [b: {c: d}]}\n",
            "a: [\n  1,\n  [2,\n   3]\n]\nb: 4\n",
            "? [a, b]\n: c\n",
            "a: \"[[[{{{\"\nb: '[[[''{{{'\n",
            "a: \"multi\n  line [[[\n  text\"\nb: [1]\n",
            "a: x [[[ {{{ y\nb: z#[[[\n",
            "a: 1 # [[[{{{\n# [[[[[[[\n",
            "a: |\n  [[[[\n    {{{{\n  - - - x\nb: >-\n  text: [[\n\nc: 1\n",
            "a: |2\n    [[[\n  b\n",
            "- |\n [[[[\n- x\n",
            "a: plain\n  continued [[[ \"unclosed\n  more\nb: [c]\n",
            "a: &anchor\n  - x\nb: !!str \"[[[\"\nc: !tag [1]\n",
            "\"quoted key\": [1, 2]\n'other': {x: y}\n",
            "url: http://host:4317/[v1]\n",
            "a:\r  b:\r    c: d\r",
            "a:\r\n  b: [1]\r\n",
            "---\na: [1]\n...\n",
            "- [a, [b, [c]]]\n- {d: {e: {f: g}}}\n",
            "a:\n  - b:\n      - c: [d]\n",
            "{\"a\":[\"b\",{\"c\":\"[[[\"}]}\n",
            "\u{feff}a: [1]\n",
        ];
        for text in documents {
            let value: Value =
                serde_norway::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert_eq!(depth(text), value_depth(&value), "{text:?}");
        }
    }

    #[test]
    fn the_shipped_configs_are_well_within_the_limit() {
        for text in [
            include_str!("../default.yaml"),
            include_str!("../direct-to-jaeger.yaml"),
            include_str!("../direct-to-tempo.yaml"),
            include_str!("../in-cluster-collector.yaml"),
            include_str!("../local-debug.yaml"),
        ] {
            let value: Value = serde_norway::from_str(text).unwrap();
            assert_eq!(depth(text), value_depth(&value));
            assert!(depth(text) <= 8);
        }
    }

    /// Random texts from YAML's indicators: whatever the parser accepts is never
    /// deeper than the scan says.
    #[test]
    fn never_counts_fewer_levels_than_the_parser() {
        const PIECES: &[&str] = &[
            "[", "]", "{", "}", ",", ": ", ":", "- ", "-", "? ", "\n", "  ", " ", "\"", "'", "a",
            "b", "#", "|", ">", "\\", "&x ", "!t ", "\r", "''", "\t", "--- ",
        ];
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut parsed = 0;
        for _ in 0..20_000 {
            let len = 1 + next() % 24;
            let text: String = (0..len)
                .map(|_| PIECES[(next() % PIECES.len() as u64) as usize])
                .collect();
            if let Ok(value) = serde_norway::from_str::<Value>(&text) {
                parsed += 1;
                assert!(depth(&text) >= value_depth(&value), "{text:?}");
            }
        }
        assert!(parsed > 1_000, "{parsed}");
    }

    /// Deep nesting after constructs that hide brackets from a naive count (quotes,
    /// plain and block scalars, comments) or show brackets that are not there: whenever
    /// the parser goes past its own recursion limit (128), so does the scan (64).
    #[test]
    fn finds_deep_nesting_behind_scalars() {
        let deep = format!("{}{}", "[".repeat(130), "]".repeat(130));
        let texts = [
            format!("a: abc\n  \"x\nb: {deep}\n"),
            format!("[abc\n\"x, {deep}]\n"),
            format!("{{a:\"x, {deep}}}\n"),
            format!("a: |2\n   x\n  y\nb: {deep}\n"),
            format!("a: \"\\\"\" \nb: {deep}\n"),
            format!("a: x # \"\nb: {deep} # \"\n"),
            format!("a: x#\"\nb: {deep}\n"),
            format!("- &a\n  {deep}\n"),
            format!("a: !t {deep}\n"),
            format!("a:\r  b: {deep}\r"),
            format!("- - - {deep}\n"),
            format!("{}x", "- ".repeat(130)),
            format!("{}x", "[a: ".repeat(70)),
            (0..130).map(|i| format!("{}a:\n", " ".repeat(i))).collect(),
        ];
        for text in &texts {
            let parsed = serde_norway::from_str::<Value>(text).map(|_| ());
            assert!(
                parsed
                    .as_ref()
                    .is_err_and(|e| e.to_string().starts_with("recursion limit exceeded")),
                "{text:?}: {parsed:?}"
            );
            assert!(nesting_depth(text, 64).is_err(), "{text:?}");
        }
    }

    #[test]
    fn reports_where_the_limit_is_passed() {
        let block: String = (0..200)
            .map(|i| format!("{}a:\n", "  ".repeat(i)))
            .collect();
        assert_eq!(nesting_depth(&block, 64), Err((65, 129)));
        let flow = format!("x: {}", "{a: ".repeat(200));
        assert_eq!(nesting_depth(&flow, 64), Err((1, 256)));
        let sequences = format!("{}x\n", "- ".repeat(200));
        assert_eq!(nesting_depth(&sequences, 64), Err((1, 129)));
        let at_limit: String = (0..64).map(|i| format!("{}a:\n", "  ".repeat(i))).collect();
        assert_eq!(nesting_depth(&at_limit, 64), Ok(64));
    }

    #[test]
    fn sizes_read_as_units() {
        assert_eq!(show_size(MAX_CONFIG_FILE_SIZE), "4 MiB");
        assert_eq!(show_size(512 << 10), "512 KiB");
        assert_eq!(show_size(1000), "1000 bytes");
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("ridley-limits-{}-{name}", std::process::id()))
    }

    #[test]
    fn reads_regular_files_up_to_the_limit() {
        let path = scratch("exact");
        std::fs::write(&path, "x".repeat(100)).unwrap();
        assert_eq!(
            read_regular_file(&path, 100, "a test file").unwrap(),
            "x".repeat(100)
        );
        assert_eq!(
            read_regular_file(&path, 99, "a test file")
                .unwrap_err()
                .to_string(),
            "larger than the 99 bytes limit for a test file"
        );
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        assert_eq!(
            read_regular_file(&path, 99, "a test file")
                .unwrap_err()
                .to_string(),
            "stream did not contain valid UTF-8"
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn refuses_what_is_not_a_regular_file() {
        let error = |path: &Path| {
            read_regular_file(path, 1 << 20, "a test file")
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            error(Path::new("/dev/zero")),
            "not a regular file (it is a character device)"
        );
        assert_eq!(
            error(&std::env::temp_dir()),
            "not a regular file (it is a directory)"
        );
        let socket = scratch("socket");
        let _ = std::fs::remove_file(&socket);
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        assert_eq!(error(&socket), "not a regular file (it is a socket)");
        std::fs::remove_file(&socket).unwrap();
        assert_eq!(
            error(Path::new("/nonexistent/file")),
            "No such file or directory (os error 2)"
        );
    }

    /// A FIFO with no writer: refused at once, where opening it would wait forever.
    #[test]
    fn refuses_a_fifo_without_waiting() {
        let fifo = scratch("fifo");
        let _ = std::fs::remove_file(&fifo);
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo runs");
        assert!(made.success());
        let (done, result) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || {
            let read = read_regular_file(&path, 1 << 20, "a test file");
            // Swapped in after the look at the path: opening does not wait either, and
            // the look at the open file refuses it.
            let opened = open_for_reading(&path)
                .and_then(|file| file.metadata())
                .and_then(|metadata| ensure_regular(metadata.file_type()));
            let _ = done.send((
                read.map_err(|e| e.to_string()),
                opened.map_err(|e| e.to_string()),
            ));
        });
        let outcome = result.recv_timeout(std::time::Duration::from_secs(5));
        std::fs::remove_file(&fifo).unwrap();
        let refused = "not a regular file (it is a FIFO)".to_owned();
        assert_eq!(outcome, Ok((Err(refused.clone()), Err(refused))));
    }
}
