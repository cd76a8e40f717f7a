//! A minimal RESP2 client for the load generator: one TCP connection, commands as arrays of
//! bulk strings, replies parsed from a read buffer. Pipelining for untimed setup.

use std::io::{self, Write};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Remaining-reads claim: decrements `n`, returns `{n, v}`, deletes the hash at zero; nil when
/// the key is gone.
pub const CLAIM_N_LUA: &str = "local r = redis.call('HMGET', KEYS[1], 'n', 'v') \
if not r[1] then return false end \
local n = tonumber(r[1]) - 1 \
if n <= 0 then redis.call('DEL', KEYS[1]) else redis.call('HSET', KEYS[1], 'n', n) end \
return {n, r[2]}";

/// A RESP2 reply; the payloads are read only through `Debug` (unexpected replies).
#[derive(Debug)]
#[allow(dead_code)]
pub enum Reply {
    Nil,
    Simple(Vec<u8>),
    Int(i64),
    Bulk(Vec<u8>),
    Array(Vec<Reply>),
    Err(String),
}

impl Reply {
    /// Neither nil nor an error.
    pub fn is_value(&self) -> bool {
        !matches!(self, Reply::Nil | Reply::Err(_))
    }
}

pub struct Conn {
    stream: TcpStream,
    wbuf: Vec<u8>,
    rbuf: Vec<u8>,
    pos: usize,
    queued: usize,
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// Offset of the first CRLF in `buf`.
fn crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

fn int(line: &[u8]) -> io::Result<i64> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad integer"))
}

/// One complete reply at the start of `buf` and its length, or None if more bytes are needed.
fn parse(buf: &[u8]) -> io::Result<Option<(Reply, usize)>> {
    let Some(&kind) = buf.first() else {
        return Ok(None);
    };
    let Some(end) = crlf(buf) else {
        return Ok(None);
    };
    let line = &buf[1..end];
    let next = end + 2;
    Ok(Some(match kind {
        b'+' => (Reply::Simple(line.to_vec()), next),
        b'-' => (Reply::Err(String::from_utf8_lossy(line).into_owned()), next),
        b':' => (Reply::Int(int(line)?), next),
        b'$' => {
            let len = int(line)?;
            if len < 0 {
                return Ok(Some((Reply::Nil, next)));
            }
            let len = len as usize;
            if buf.len() < next + len + 2 {
                return Ok(None);
            }
            (Reply::Bulk(buf[next..next + len].to_vec()), next + len + 2)
        }
        b'*' => {
            let n = int(line)?;
            if n < 0 {
                return Ok(Some((Reply::Nil, next)));
            }
            let mut items = Vec::with_capacity(n as usize);
            let mut at = next;
            for _ in 0..n {
                match parse(&buf[at..])? {
                    Some((r, used)) => {
                        items.push(r);
                        at += used;
                    }
                    None => return Ok(None),
                }
            }
            (Reply::Array(items), at)
        }
        _ => return Err(bad("unknown reply type")),
    }))
}

impl Conn {
    pub async fn connect(addr: &str) -> io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            wbuf: Vec::with_capacity(4096),
            rbuf: Vec::with_capacity(64 * 1024),
            pos: 0,
            queued: 0,
        })
    }

    /// Queue a command (sent by `flush`/`cmd`).
    pub fn push(&mut self, args: &[&[u8]]) {
        let w = &mut self.wbuf;
        let _ = write!(w, "*{}\r\n", args.len());
        for a in args {
            let _ = write!(w, "${}\r\n", a.len());
            w.extend_from_slice(a);
            w.extend_from_slice(b"\r\n");
        }
        self.queued += 1;
    }

    /// Send the queued commands and read one reply for each.
    pub async fn flush(&mut self) -> io::Result<Vec<Reply>> {
        self.stream.write_all(&self.wbuf).await?;
        self.wbuf.clear();
        let n = std::mem::take(&mut self.queued);
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.read_reply().await?);
        }
        Ok(out)
    }

    /// One command, one reply.
    pub async fn cmd(&mut self, args: &[&[u8]]) -> io::Result<Reply> {
        self.push(args);
        self.stream.write_all(&self.wbuf).await?;
        self.wbuf.clear();
        self.queued = 0;
        self.read_reply().await
    }

    async fn read_reply(&mut self) -> io::Result<Reply> {
        loop {
            if let Some((reply, used)) = parse(&self.rbuf[self.pos..])? {
                self.pos += used;
                if self.pos == self.rbuf.len() {
                    self.rbuf.clear();
                    self.pos = 0;
                }
                return Ok(reply);
            }
            if self.pos > 0 {
                self.rbuf.drain(..self.pos);
                self.pos = 0;
            }
            self.rbuf.reserve(64 * 1024);
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "redis closed the connection",
                ));
            }
        }
    }
}
