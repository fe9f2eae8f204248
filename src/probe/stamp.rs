//! A TCP stream that knows when its bytes arrived. Every read asks the kernel for the time
//! the newest bytes reached the socket (`SO_TIMESTAMPNS`, as `ping` does), so the moment a
//! WebSocket message *arrived* is not confused with the moment a busy agent got round to
//! reading it. A listen probe's `final` phase, or a WebSocket step's reply time, then
//! measures the service and the network, not the agent's own run queue: on a loaded agent
//! (1,000 sessions on two cores, docs/BENCHMARKS.md) that queue wait was most of the error.
//!
//! The stamp of a read is the arrival of the newest segment it returned, so a message's
//! stamp is never earlier than the message's own arrival: the error can only overstate the
//! latency, by at most the gap to bytes read together with it.
//!
//! Where the kernel gives no stamp (not Linux, the option refused) a read is stamped when it
//! returns, as before. Not here: what is done with the stamps (the probes read
//! [`arrived`](super::websocket::arrived)).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// When the bytes of the latest read reached the socket.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    /// On the monotonic clock the probes time with.
    pub at: Instant,
    /// The same moment on the system clock (the kernel's own stamp when there is one).
    pub wall: SystemTime,
    /// The kernel stamped these bytes (else they are stamped when the read returned: the
    /// kernel turns stamping on for the whole network stack a moment after the first socket
    /// asks, so the first bytes on a quiet host may come unstamped).
    pub kernel: bool,
}

/// A [`TcpStream`] whose reads are stamped with the bytes' arrival.
#[derive(Debug)]
pub struct Stamped {
    io: TcpStream,
    /// The kernel stamps this socket's reads.
    kernel: bool,
    /// Bytes cannot have arrived before the stream existed: a floor for a stamp that a
    /// system-clock step would otherwise move into the past.
    opened: Instant,
    arrived: Option<Arrival>,
}

impl Stamped {
    /// Ask the kernel to stamp `io`'s incoming bytes; reads are stamped on return when it
    /// will not.
    pub fn new(io: TcpStream) -> Stamped {
        let kernel = kernel::enable(&io);
        Stamped {
            io,
            kernel,
            opened: Instant::now(),
            arrived: None,
        }
    }

    /// When the bytes of the latest read that returned any arrived.
    pub fn arrived(&self) -> Option<Arrival> {
        self.arrived
    }

    /// Put the kernel's stamp (a system-clock time) on the monotonic clock, by the two
    /// clocks' readings now. A stamp "from the future" (the system clock stepped back) is
    /// taken as now; one from before the stream opened as the opening.
    fn arrival(&self, stamp: Option<SystemTime>) -> Arrival {
        let now = Instant::now();
        let wall = SystemTime::now();
        let Some(stamp) = stamp else {
            return Arrival {
                at: now,
                wall,
                kernel: false,
            };
        };
        let waited = wall.duration_since(stamp).unwrap_or(Duration::ZERO);
        let at = now
            .checked_sub(waited)
            .unwrap_or(self.opened)
            .max(self.opened);
        Arrival {
            at,
            wall: wall - now.duration_since(at),
            kernel: true,
        }
    }
}

impl AsyncRead for Stamped {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if !me.kernel {
            let before = buf.filled().len();
            ready!(Pin::new(&mut me.io).poll_read(cx, buf))?;
            if buf.filled().len() > before {
                me.arrived = Some(me.arrival(None));
            }
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(me.io.poll_read_ready(cx))?;
            let io = &me.io;
            let got = io.try_io(tokio::io::Interest::READABLE, || {
                // SAFETY: `recv` writes at most the unfilled part's length, and only
                // initialised bytes up to the count it returns are marked filled below.
                kernel::recv(io, unsafe { buf.unfilled_mut() })
            });
            match got {
                Ok((n, stamp)) => {
                    // SAFETY: the kernel wrote `n` bytes into the unfilled part.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    if n > 0 {
                        me.arrived = Some(me.arrival(stamp));
                    }
                    return Poll::Ready(Ok(()));
                }
                // Readiness was stale: `try_io` cleared it, wait for the next.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for Stamped {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(target_os = "linux")]
mod kernel {
    use std::io;
    use std::mem::{size_of, MaybeUninit};
    use std::os::fd::AsRawFd;
    use std::time::{Duration, SystemTime};

    use tokio::net::TcpStream;

    /// Turn on `SO_TIMESTAMPNS`; false when the kernel refuses it.
    pub(super) fn enable(io: &TcpStream) -> bool {
        let on: libc::c_int = 1;
        // SAFETY: setsockopt only reads the `c_int` we pass, of the length we pass.
        let rc = unsafe {
            libc::setsockopt(
                io.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_TIMESTAMPNS,
                (&on as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        rc == 0
    }

    /// One `recvmsg` into `buf`: the byte count and the arrival stamp of the newest segment
    /// read, when the kernel sent one.
    pub(super) fn recv(
        io: &TcpStream,
        buf: &mut [MaybeUninit<u8>],
    ) -> io::Result<(usize, Option<SystemTime>)> {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // Room for one `struct timespec` control message, 8-byte aligned; the kernel sends
        // nothing else on a TCP socket with only this option on.
        let mut control = [0u64; 8];
        // SAFETY: an all-zero msghdr is a valid empty one; its pointers are set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = size_of::<[u64; 8]>() as _;
        // SAFETY: `msg` points at `iov` (into `buf`, of its length) and `control`, both
        // alive for the call; the socket is non-blocking (tokio's).
        let n = unsafe { libc::recvmsg(io.as_raw_fd(), &mut msg, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut stamp = None;
        // SAFETY: the CMSG_* macros walk the control buffer the kernel filled, within
        // `msg_controllen`; the data of an SCM_TIMESTAMPNS message is one `timespec`,
        // read unaligned.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                    let ts: libc::timespec =
                        std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::timespec>());
                    if ts.tv_sec >= 0 && (0..1_000_000_000).contains(&ts.tv_nsec) {
                        stamp = Some(
                            SystemTime::UNIX_EPOCH
                                + Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32),
                        );
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        Ok((n as usize, stamp))
    }
}

#[cfg(not(target_os = "linux"))]
mod kernel {
    use std::io;
    use std::mem::MaybeUninit;
    use std::time::SystemTime;

    use tokio::net::TcpStream;

    pub(super) fn enable(_: &TcpStream) -> bool {
        false
    }

    pub(super) fn recv(
        _: &TcpStream,
        _: &mut [MaybeUninit<u8>],
    ) -> io::Result<(usize, Option<SystemTime>)> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (Stamped, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        (Stamped::new(c.unwrap()), s.unwrap().0)
    }

    /// Bytes that sat in the socket while the reader was busy are stamped with their
    /// arrival, not the read: the wait is not counted. (The first exchange on a quiet host
    /// may be unstamped, see [`Arrival::kernel`]; then it is stamped at the read.)
    #[tokio::test]
    async fn a_late_read_is_stamped_with_the_arrival() {
        let (mut r, mut w) = pair().await;
        assert!(r.kernel, "the kernel stamps TCP reads on Linux");
        let mut stamped = 0;
        for _ in 0..5 {
            let before = Instant::now();
            w.write_all(b"final").await.unwrap();
            let written = Instant::now();
            // The reader is busy elsewhere for 200 ms.
            std::thread::sleep(Duration::from_millis(200));
            let mut buf = [0u8; 16];
            let n = r.read(&mut buf).await.unwrap();
            let read = Instant::now();
            assert_eq!(&buf[..n], b"final");
            let a = r.arrived().expect("a read is stamped");
            if !a.kernel {
                assert!(a.at >= written + Duration::from_millis(190));
                continue;
            }
            stamped += 1;
            assert!(a.at >= before, "{:?} before the write began", before - a.at);
            assert!(
                a.at <= written + Duration::from_millis(20),
                "stamped {:?} after the write returned, {:?} before the read",
                a.at - written,
                read - a.at
            );
            let wall_gap = SystemTime::now().duration_since(a.wall).unwrap();
            assert!(
                wall_gap >= Duration::from_millis(190),
                "wall stamp {wall_gap:?} old"
            );
        }
        assert!(
            stamped >= 3,
            "only {stamped} of 5 reads had the kernel's stamp"
        );
    }

    /// A second read carries the newer bytes' arrival; an empty read (the peer closed)
    /// keeps the last stamp.
    #[tokio::test]
    async fn each_read_carries_its_own_arrival() {
        let (mut r, mut w) = pair().await;
        w.write_all(b"one").await.unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(r.read(&mut buf).await.unwrap(), 3);
        let first = r.arrived().unwrap().at;
        tokio::time::sleep(Duration::from_millis(50)).await;
        w.write_all(b"two").await.unwrap();
        let n = r.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"two");
        let second = r.arrived().unwrap().at;
        assert!(
            second >= first + Duration::from_millis(45),
            "{:?}",
            second - first
        );
        drop(w);
        assert_eq!(r.read(&mut buf).await.unwrap(), 0);
        assert_eq!(r.arrived().unwrap().at, second);
    }

    /// A kernel stamp the system clock puts after now (it stepped back) is taken as now; one
    /// before the stream opened (it stepped forward) as the opening.
    #[tokio::test]
    async fn a_stamp_off_the_clock_is_bounded() {
        let (r, _w) = pair().await;
        let now = Instant::now();
        let future = r.arrival(Some(SystemTime::now() + Duration::from_secs(60)));
        assert!(future.at >= now && future.at <= Instant::now());
        let past = r.arrival(Some(SystemTime::now() - Duration::from_secs(3600)));
        assert_eq!(past.at, r.opened);
    }
}
