//! Property tests of the shared ring protocol: a frontend and a backend over one page, driven
//! by random interleavings, with responses in random order, and a model of the event-channel
//! notification rule (a side that went to sleep after its final check is woken only by a push
//! that said "notify"), and backend crashes that resume from the shared indexes and an
//! in-flight journal. Also: a hostile peer's producer index, and a two-thread stress run.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use devchan::ring::{BackRing, FrontRing, IdAllocator, InFlight, OwnedPage, RingError, RingIdx};
use proptest::prelude::*;

/// Request: `[id, seq]`; response: `[id, seq]` echoed.
type Msg = [u32; 2];
type Front = FrontRing<Msg, Msg>;
type Back = BackRing<Msg, Msg>;

fn rings(page: &OwnedPage) -> (Front, Back) {
    // SAFETY: the page is 4 KiB, page-aligned, and outlives the rings in each test.
    unsafe {
        (
            Front::init(page.as_non_null(), OwnedPage::SIZE).unwrap(),
            Back::attach_at(page.as_non_null(), OwnedPage::SIZE, 0, 0).unwrap(),
        )
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// Frontend issues up to n new requests.
    FrontPut(u8),
    /// Frontend publishes its requests (and notifies if told to).
    FrontPush,
    /// Frontend, if awake, consumes up to n responses.
    FrontPoll(u8),
    /// Frontend, if awake, runs its final check and sleeps if there is nothing.
    FrontSleep,
    /// Backend, if awake, consumes up to n requests.
    BackGet(u8),
    /// Backend answers the consumed request at position `pick` (out of order).
    BackRespond(u16),
    /// Backend publishes its responses (and notifies if told to).
    BackPush,
    /// Backend, if awake, runs its final check and sleeps if there is nothing.
    BackSleep,
    /// The backend process dies; a new one resumes from the shared `rsp_prod` and the journal.
    BackCrash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1u8..8).prop_map(Op::FrontPut),
        Just(Op::FrontPush),
        (1u8..8).prop_map(Op::FrontPoll),
        Just(Op::FrontSleep),
        (1u8..8).prop_map(Op::BackGet),
        any::<u16>().prop_map(Op::BackRespond),
        Just(Op::BackPush),
        Just(Op::BackSleep),
        Just(Op::BackCrash),
    ]
}

struct Model {
    front: Front,
    back: Back,
    ids: IdAllocator<u32>,
    next_seq: u32,
    back_expect_seq: u32,
    back_pending: Vec<Msg>,
    /// What a backend keeps outside its process: requests consumed and not yet answered by a
    /// pushed response.
    journal: InFlight<Msg>,
    /// Ids answered but not pushed (lost if the backend dies).
    unpushed: Vec<u64>,
    page: core::ptr::NonNull<u8>,
    responses_seen: u32,
    front_asleep: bool,
    back_asleep: bool,
}

impl Model {
    fn new(page: &OwnedPage) -> Self {
        let (front, back) = rings(page);
        let size = front.size();
        Self {
            front,
            back,
            ids: IdAllocator::new(size),
            next_seq: 0,
            back_expect_seq: 0,
            back_pending: Vec::new(),
            journal: InFlight::new(size as usize),
            unpushed: Vec::new(),
            page: page.as_non_null(),
            responses_seen: 0,
            front_asleep: false,
            back_asleep: false,
        }
    }

    fn front_push(&mut self) {
        if self.front.push_requests() {
            self.back_asleep = false; // the event wakes the backend
        }
    }

    fn back_push(&mut self) {
        if self.back.push_responses() {
            self.front_asleep = false;
        }
        for id in self.unpushed.drain(..) {
            self.journal.remove(id).unwrap();
        }
    }

    fn back_crash(&mut self) {
        // SAFETY: the page outlives the model (see `Model::new`'s callers).
        self.back = unsafe { Back::resume(self.page, OwnedPage::SIZE, self.back.req_cons()) }
            .expect("journal consistent with the ring");
        self.unpushed.clear();
        self.back_pending = self.journal.iter().map(|(_, m)| *m).collect();
        assert_eq!(self.back.unanswered() as usize, self.back_pending.len());
        self.back_asleep = false; // a new process starts by looking at the ring
    }

    fn front_poll(&mut self, n: u32) {
        for _ in 0..n {
            let Some([id, seq]) = self.front.get_response().unwrap() else {
                break;
            };
            // Every response answers a request in flight, exactly once.
            assert_eq!(self.ids.complete(id.into()), Ok(seq), "response id {id}");
            self.responses_seen += 1;
        }
    }

    fn back_get(&mut self, n: u32) {
        for _ in 0..n {
            let Some(req) = self.back.get_request().unwrap() else {
                break;
            };
            // Requests arrive once each, in order.
            assert_eq!(req[1], self.back_expect_seq);
            self.back_expect_seq += 1;
            self.journal.insert(req[0].into(), req).unwrap();
            self.back_pending.push(req);
        }
    }

    fn back_respond(&mut self, pick: usize) {
        if self.back_pending.is_empty() {
            assert_eq!(self.back.put_response(&[0, 0]), Err(RingError::Unrequested));
            return;
        }
        let req = self
            .back_pending
            .swap_remove(pick % self.back_pending.len());
        self.back.put_response(&req).unwrap();
        self.unpushed.push(req[0].into());
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::FrontPut(n) => {
                for _ in 0..n {
                    if self.front.is_full() {
                        assert_eq!(self.front.put_request(&[0, 0]), Err(RingError::Full));
                        break;
                    }
                    let seq = self.next_seq;
                    let id = self.ids.alloc(seq).unwrap();
                    self.front.put_request(&[id, seq]).unwrap();
                    self.next_seq += 1;
                }
            }
            Op::FrontPush => self.front_push(),
            Op::FrontPoll(n) if !self.front_asleep => self.front_poll(n.into()),
            Op::FrontSleep if !self.front_asleep => {
                self.front_asleep = !self.front.final_check_for_responses().unwrap();
            }
            Op::BackGet(n) if !self.back_asleep => self.back_get(n.into()),
            Op::BackRespond(pick) => self.back_respond(pick.into()),
            Op::BackPush => self.back_push(),
            Op::BackSleep if !self.back_asleep => {
                self.back_asleep = !self.back.final_check_for_requests().unwrap();
            }
            Op::BackCrash => self.back_crash(),
            _ => {} // a sleeping side does not poll
        }
        self.check_no_lost_wakeup();
    }

    /// A sleeping side must never have published work waiting for it.
    fn check_no_lost_wakeup(&self) {
        if self.back_asleep {
            assert_eq!(
                self.back.unconsumed_requests(),
                Ok(0),
                "backend sleeps on requests"
            );
        }
        if self.front_asleep {
            assert_eq!(
                self.front.unconsumed_responses(),
                Ok(0),
                "frontend sleeps on responses"
            );
        }
    }

    /// Let both sides run as an event-driven driver would until all is answered; only events
    /// wake a sleeping side.
    fn drain(&mut self) {
        self.front_push();
        for _ in 0..10_000 {
            if !self.back_asleep {
                self.back_get(u32::MAX);
            }
            // Requests already consumed complete whether or not the ring is idle.
            while !self.back_pending.is_empty() {
                self.back_respond(self.back_pending.len() / 2);
            }
            self.back_push();
            if !self.back_asleep {
                self.back_asleep = !self.back.final_check_for_requests().unwrap();
            }
            if !self.front_asleep {
                self.front_poll(u32::MAX);
                self.front_asleep = !self.front.final_check_for_responses().unwrap();
            }
            self.check_no_lost_wakeup();
            if self.front_asleep && self.back_asleep {
                break;
            }
        }
        assert!(
            self.front_asleep && self.back_asleep,
            "drain did not settle"
        );
        // Both asleep with nothing lost: every request was delivered and answered.
        assert_eq!(self.back_expect_seq, self.next_seq, "requests delivered");
        assert_eq!(self.responses_seen, self.next_seq, "responses delivered");
        assert!(self.ids.is_empty());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn interleavings_deliver_everything_once_without_lost_wakeups(
        ops in prop::collection::vec(op(), 0..600)
    ) {
        let page = OwnedPage::new();
        let mut m = Model::new(&page);
        for op in &ops {
            m.apply(op);
        }
        m.drain();
    }

    /// The notification decision is exactly Xen's rule: notify iff the event index lies in
    /// (old, new], in wrapping arithmetic.
    #[test]
    fn push_notifies_iff_event_index_was_passed(
        start in any::<u32>(), event_off in 0u32..300, n in 0u32..200
    ) {
        let mut page = OwnedPage::new();
        // SAFETY: as in `rings`.
        let mut front = unsafe {
            Front::init(page.as_non_null(), OwnedPage::SIZE).unwrap();
            Front::attach_at(page.as_non_null(), OwnedPage::SIZE, start, start).unwrap()
        };
        let event = start.wrapping_add(event_off);
        page.write_at(0, &start.to_ne_bytes()); // req_prod = old
        page.write_at(4, &event.to_ne_bytes()); // req_event
        for i in 0..n {
            front.put_request(&[i, i]).unwrap();
        }
        let notify = front.push_requests();
        prop_assert_eq!(notify, event_off >= 1 && event_off <= n);
        let snap = page.snapshot();
        prop_assert_eq!(&snap[0..4], &start.wrapping_add(n).to_ne_bytes());
    }

    /// A hostile frontend's req_prod never causes a panic or an out-of-range read: the backend
    /// gets exactly the requests that can be in range, or `Overflow`.
    #[test]
    fn hostile_request_producer(
        start in any::<u32>(),
        steps in prop::collection::vec((any::<u32>(), 0u32..300, 0u32..40, 0u32..40), 1..40)
    ) {
        let mut page = OwnedPage::new();
        // SAFETY: as in `rings`.
        let mut back = unsafe {
            Back::init(page.as_non_null(), OwnedPage::SIZE).unwrap();
            Back::attach_at(page.as_non_null(), OwnedPage::SIZE, start, start).unwrap()
        };
        let size = back.size();
        for (raw, near, gets, answers) in steps {
            // Half the time a plausible index near our consumer, otherwise anything.
            let prod = if raw & 1 == 0 { back.req_cons().wrapping_add(near) } else { raw };
            page.write_at(0, &prod.to_ne_bytes());
            let in_range = prod.wrapping_sub(back.rsp_prod_pvt()) <= size
                && prod.wrapping_sub(back.rsp_prod_pvt()) >= back.unanswered();
            let mut expect = if in_range { prod.wrapping_sub(back.req_cons()) } else { 0 };
            for _ in 0..gets {
                let got = back.get_request();
                if !in_range {
                    prop_assert_eq!(got, Err(RingError::Overflow { prod, cons: back.req_cons() }));
                } else if expect > 0 {
                    prop_assert!(got.unwrap().is_some());
                    expect -= 1;
                } else {
                    prop_assert_eq!(got, Ok(None));
                }
            }
            prop_assert!(back.unanswered() <= size);
            for _ in 0..answers {
                if back.put_response(&[0, 0]).is_err() {
                    break;
                }
            }
            back.push_responses();
        }
    }

    /// A hostile backend's rsp_prod: the frontend gets at most the responses it has requests
    /// outstanding for, or `Overflow`.
    #[test]
    fn hostile_response_producer(
        outstanding in 0u32..=256, rsp_prod in any::<u32>(), near in 0u32..300
    ) {
        let mut page = OwnedPage::new();
        let (mut front, _back) = rings(&page);
        for i in 0..outstanding {
            front.put_request(&[i, i]).unwrap();
        }
        front.push_requests();
        let prod = if rsp_prod & 1 == 0 { near } else { rsp_prod };
        page.write_at(8, &prod.to_ne_bytes());
        let mut got = 0u32;
        loop {
            match front.get_response() {
                Ok(Some(_)) => got += 1,
                Ok(None) => break,
                Err(e) => {
                    prop_assert!(prod > outstanding);
                    prop_assert_eq!(e, RingError::Overflow { prod, cons: got });
                    break;
                }
            }
            prop_assert!(got <= outstanding);
        }
        if prod <= outstanding {
            prop_assert_eq!(got, prod);
        }
    }
}

/// The event channel between the two threads: a pending flag and the thread to wake.
struct Event {
    pending: AtomicBool,
    thread: std::thread::Thread,
}

impl Event {
    fn send(&self) {
        self.pending.store(true, Ordering::Release);
        self.thread.unpark();
    }

    /// Wait for an event; true if it timed out (which with correct hold-off logic never
    /// happens while the peer has work for us).
    fn wait(&self) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !self.pending.swap(false, Ordering::Acquire) {
            if std::time::Instant::now() > deadline {
                return true;
            }
            std::thread::park_timeout(Duration::from_millis(100));
        }
        false
    }
}

#[test]
fn two_threads_exchange_many_requests_out_of_order() {
    const N: u32 = 200_000;
    let page = Arc::new(OwnedPage::new());
    let (mut front, back) = rings(&page);
    let back_thread_ready = Arc::new(AtomicU32::new(0));
    let front_event = Arc::new(Event {
        pending: AtomicBool::new(false),
        thread: std::thread::current(),
    });

    let (tx, rx) = std::sync::mpsc::channel::<Arc<Event>>();
    let page2 = Arc::clone(&page);
    let fe = Arc::clone(&front_event);
    let ready = Arc::clone(&back_thread_ready);
    let backend = std::thread::spawn(move || {
        let _keep = page2;
        let mut back = back;
        let me = Arc::new(Event {
            pending: AtomicBool::new(false),
            thread: std::thread::current(),
        });
        tx.send(Arc::clone(&me)).unwrap();
        ready.store(1, Ordering::Release);
        let mut held: Vec<Msg> = Vec::new();
        let mut answered = 0u32;
        let mut timeouts = 0u32;
        while answered < N {
            while let Some(req) = back.get_request().unwrap() {
                held.push(req);
            }
            // Answer in reverse order of arrival: out of order.
            while let Some(req) = held.pop() {
                back.put_response(&req).unwrap();
                answered += 1;
            }
            if back.push_responses() {
                fe.send();
            }
            if answered < N && !back.final_check_for_requests().unwrap() && me.wait() {
                timeouts += 1;
            }
        }
        timeouts
    });
    let back_event = rx.recv().unwrap();

    let mut ids = IdAllocator::new(front.size());
    let (mut sent, mut received, mut timeouts) = (0u32, 0u32, 0u32);
    while received < N {
        while sent < N && !front.is_full() {
            let id = ids.alloc(sent).unwrap();
            front.put_request(&[id, sent]).unwrap();
            sent += 1;
        }
        if front.push_requests() {
            back_event.send();
        }
        while let Some([id, seq]) = front.get_response().unwrap() {
            assert_eq!(ids.complete(id.into()), Ok(seq));
            received += 1;
        }
        if received < N
            && !front.final_check_for_responses().unwrap()
            && (sent == N || front.is_full())
            && front_event.wait()
        {
            timeouts += 1;
        }
    }
    assert_eq!(backend.join().unwrap(), 0, "backend missed a wake-up");
    assert_eq!(timeouts, 0, "frontend missed a wake-up");
    assert!(ids.is_empty());
    let idx: RingIdx = front.rsp_cons();
    assert_eq!(idx, N);
}
