//! A small TCP proxy of the harness's own: put it between a process and a service, then
//! "stop" the service for that process only (cut every connection, refuse new ones), or make it
//! vanish silently (hold every connection, move no byte), without touching the shared service
//! other tests use.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Forward bytes.
const FORWARDING: u8 = 0;
/// Close every connection, refuse (close at once) new ones: a stopped service, the kernel
/// answers.
const REFUSING: u8 = 1;
/// Hold every connection open and move no byte either way; accept new connections and hold
/// them too: a host that vanished without a word (no RST, no FIN), as after a power cut or a
/// network partition. Peers only notice through their own timeouts and heartbeats.
const BLACK_HOLE: u8 = 2;

pub struct TcpProxy {
    pub address: SocketAddr,
    mode: Arc<AtomicU8>,
    /// Connections forwarded (or held) right now.
    open: Arc<AtomicUsize>,
    /// Bumped on every change of mode: connection tasks re-read the mode.
    generation: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy binds");
        let address = listener.local_addr().expect("proxy address");
        let mode = Arc::new(AtomicU8::new(FORWARDING));
        let open = Arc::new(AtomicUsize::new(0));
        let (generation, _) = watch::channel(0_u64);
        let task = {
            let (mode, open, generation) = (mode.clone(), open.clone(), generation.clone());
            tokio::spawn(async move {
                while let Ok((inbound, _)) = listener.accept().await {
                    let connection = Connection {
                        inbound,
                        upstream,
                        mode: mode.clone(),
                        open: open.clone(),
                        changes: generation.subscribe(),
                    };
                    tokio::spawn(connection.run());
                }
            })
        };
        Self {
            address,
            mode,
            open,
            generation,
            task,
        }
    }

    /// Cuts every open connection and refuses new ones.
    pub fn disable(&self) {
        self.set_mode(REFUSING);
    }

    /// Goes silent: see [`BLACK_HOLE`]. Held connections are closed on the next change of
    /// mode (as a host that comes back has forgotten them).
    pub fn black_hole(&self) {
        self.set_mode(BLACK_HOLE);
    }

    /// Accepts connections again.
    pub fn enable(&self) {
        self.set_mode(FORWARDING);
    }

    /// Connections open through the proxy right now (held ones included).
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    fn set_mode(&self, mode: u8) {
        if self.mode.swap(mode, Ordering::SeqCst) != mode {
            self.generation.send_modify(|generation| *generation += 1);
        }
    }
}

/// One accepted connection.
struct Connection {
    inbound: TcpStream,
    upstream: SocketAddr,
    mode: Arc<AtomicU8>,
    open: Arc<AtomicUsize>,
    changes: watch::Receiver<u64>,
}

impl Connection {
    async fn run(mut self) {
        let _open = OpenConnection::count(&self.open);
        match self.mode.load(Ordering::SeqCst) {
            REFUSING => return,
            BLACK_HOLE => {
                // Held until the mode changes or the proxy goes away, then dropped.
                let _ = self.changes.changed().await;
                return;
            }
            _ => {}
        }
        let Ok(mut outbound) = TcpStream::connect(self.upstream).await else {
            return;
        };
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut self.inbound, &mut outbound) => return,
            _ = self.changes.changed() => {}
        }
        if self.mode.load(Ordering::SeqCst) == BLACK_HOLE {
            // Both sockets stay open and silent until the next change of mode.
            let _ = self.changes.changed().await;
        }
    }
}

/// Counts a connection as open for as long as it lives.
struct OpenConnection(Arc<AtomicUsize>);

impl OpenConnection {
    fn count(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::SeqCst);
        Self(open.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
