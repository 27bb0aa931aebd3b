//! Transactions under contention: clients on separate sockets and a domain on its ring all
//! increment one counter inside transactions, retrying on `EAGAIN`. If conflict detection let
//! a lost update through, the final count would be short.

use std::sync::Arc;
use std::thread;

use devchan::xenstore::client::NO_TX;
use devchan::xenstore::perms::Perm;
use devchan::xenstore::ring::{OwnedRingPage, RingTransport};
use devchan::xenstore::{Client, ClientError, XsError};
use hypervisor::xenstored::ring::{serve_ring, EventFdSignal};
use hypervisor::xenstored::socket::{connect, SocketServer};
use hypervisor::xenstored::Xenstored;

const PER_CLIENT: u32 = 40;

fn increment<T: std::io::Read + std::io::Write>(c: &mut Client<T>, path: &str) -> u32 {
    let mut retries = 0;
    loop {
        let tx = c.transaction_start().unwrap();
        let v: u32 = String::from_utf8(c.read(tx, path).unwrap())
            .unwrap()
            .parse()
            .unwrap();
        c.write(tx, path, (v + 1).to_string().as_bytes()).unwrap();
        match c.transaction_end(tx, true) {
            Ok(()) => return retries,
            Err(ClientError::Xs(XsError::Eagain)) => retries += 1,
            Err(e) => panic!("commit failed: {e}"),
        }
    }
}

#[test]
fn concurrent_transactions_lose_no_update() {
    let dir = tempfile::tempdir().unwrap();
    let xs = Xenstored::new();
    let handle = SocketServer::bind(dir.path().join("s"), Arc::clone(&xs))
        .unwrap()
        .spawn()
        .unwrap();
    let path = handle.path().to_path_buf();

    let mut admin = connect(&path).unwrap();
    admin.write(NO_TX, "/local/domain/3/counter", b"0").unwrap();
    admin
        .set_perms(NO_TX, "/local/domain/3", &[Perm::new(3, 0)])
        .unwrap();
    admin
        .set_perms(NO_TX, "/local/domain/3/counter", &[Perm::new(3, 0)])
        .unwrap();

    let mem = Arc::new(OwnedRingPage::new());
    let signal = Arc::new(EventFdSignal::new().unwrap());
    let ring_server = {
        let (xs, mem, signal) = (Arc::clone(&xs), Arc::clone(&mem), Arc::clone(&signal));
        thread::spawn(move || serve_ring(&xs, 3, &mem.view(), &signal))
    };

    let mut workers = Vec::new();
    for _ in 0..3 {
        let path = path.clone();
        workers.push(thread::spawn(move || {
            let mut c = connect(&path).unwrap();
            (0..PER_CLIENT)
                .map(|_| increment(&mut c, "/local/domain/3/counter"))
                .sum::<u32>()
        }));
    }
    {
        let (mem, signal) = (Arc::clone(&mem), Arc::clone(&signal));
        workers.push(thread::spawn(move || {
            let (notify, wait) = signal.domain_side();
            let mut c = Client::new(RingTransport::new(mem.view(), notify, wait));
            (0..PER_CLIENT)
                .map(|_| increment(&mut c, "counter"))
                .sum::<u32>()
        }));
    }
    let retries: u32 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    let total = admin.read(NO_TX, "/local/domain/3/counter").unwrap();
    assert_eq!(
        String::from_utf8(total).unwrap(),
        (4 * PER_CLIENT).to_string()
    );
    eprintln!(
        "{} increments, {retries} retries after EAGAIN",
        4 * PER_CLIENT
    );
    xs.close_domain(3);
    ring_server.join().unwrap().unwrap();
}
