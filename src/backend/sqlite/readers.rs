//! Read connections beside the writer. In WAL mode a reader sees every
//! transaction committed before its read began and never waits for the
//! writer, so the Web API's and the control commands' reads (Retrieve,
//! RetrieveMultiple pages, counts, the bookkeeping) run on these threads
//! instead of queueing behind batch writes on the writer's.

use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};

use rusqlite::{Connection, OpenFlags};

use crate::backend::BackendError;

/// A read, run on one of the reader threads' connections.
pub(super) type ReadJob = Box<dyn FnOnce(&mut Connection) + Send>;

/// Reader threads: two, so a Retrieve never waits for a 5,000-row page.
pub(super) const READERS: usize = 2;

pub(super) fn start(path: &Path) -> Result<mpsc::SyncSender<ReadJob>, BackendError> {
    let (jobs, rx) = mpsc::sync_channel::<ReadJob>(64);
    let rx = Arc::new(Mutex::new(rx));
    for n in 0..READERS {
        let mut conn = open(path).map_err(|e| BackendError::Transient(format!("{}: {e}", path.display())))?;
        let rx = Arc::clone(&rx);
        std::thread::Builder::new()
            .name(format!("sqlite-reader-{n}"))
            .spawn(move || {
                loop {
                    // The lock is held only while waiting for the next job.
                    let job = match rx.lock() {
                        Ok(receiver) => receiver.recv(),
                        Err(poisoned) => poisoned.into_inner().recv(),
                    };
                    match job {
                        Ok(job) => job(&mut conn),
                        Err(_) => return,
                    }
                }
            })
            .map_err(|e| BackendError::Transient(format!("starting a SQLite reader: {e}")))?;
    }
    Ok(jobs)
}

/// A read-only connection to the (migrated) file.
fn open(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // A modest cache each: the writer's 128 MB holds the hot pages already.
    conn.pragma_update(None, "cache_size", -16_384)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(conn)
}
