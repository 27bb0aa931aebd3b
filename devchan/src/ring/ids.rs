//! Matching out-of-order responses to requests by id: [`IdAllocator`] for the end that
//! chooses the ids (a frontend), [`InFlight`] for the end that receives them (a backend's
//! journal of consumed, unanswered requests).

use super::RingError;

/// Request ids a frontend hands out, with the shadow copy of each request in flight: answers
/// that arrive in any order are matched by id, and an id that is not in flight is rejected.
/// After a reconnect, [`IdAllocator::drain`] yields what must be reissued.
#[derive(Debug, Clone)]
pub struct IdAllocator<T> {
    slots: Vec<Option<T>>,
    /// Free ids, lowest on top.
    free: Vec<u32>,
}

impl<T> IdAllocator<T> {
    /// A table of ids `0..capacity` (normally the ring size).
    pub fn new(capacity: u32) -> Self {
        Self {
            slots: (0..capacity).map(|_| None).collect(),
            free: (0..capacity).rev().collect(),
        }
    }

    /// Take a free id for a request whose shadow is `value`.
    pub fn alloc(&mut self, value: T) -> Result<u32, RingError> {
        let id = self
            .free
            .pop()
            .ok_or(RingError::IdsExhausted(self.slots.len()))?;
        self.slots[id as usize] = Some(value);
        Ok(id)
    }

    /// The response for `id` arrived: free the id and return the shadow.
    pub fn complete(&mut self, id: u64) -> Result<T, RingError> {
        let slot = usize::try_from(id)
            .ok()
            .and_then(|i| self.slots.get_mut(i))
            .ok_or(RingError::UnknownId(id))?;
        let value = slot.take().ok_or(RingError::UnknownId(id))?;
        // Cannot truncate: the slot exists, so id < capacity <= u32::MAX.
        #[allow(clippy::cast_possible_truncation)]
        self.free.push(id as u32);
        Ok(value)
    }

    /// The shadow of an id in flight.
    pub fn get(&self, id: u64) -> Option<&T> {
        self.slots.get(usize::try_from(id).ok()?)?.as_ref()
    }

    /// Ids in flight.
    pub fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// No id is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every request in flight, by id.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &T)> {
        (0u32..)
            .zip(&self.slots)
            .filter_map(|(id, s)| s.as_ref().map(|v| (id, v)))
    }

    /// Free every id and return the shadows (for reissue on a new ring), by id.
    pub fn drain(&mut self) -> Vec<(u32, T)> {
        let out = (0u32..)
            .zip(self.slots.iter_mut())
            .filter_map(|(id, s)| s.take().map(|v| (id, v)));
        let out: Vec<_> = out.collect();
        let cap = u32::try_from(self.slots.len()).unwrap_or(u32::MAX);
        self.free = (0..cap).rev().collect();
        out
    }
}

/// Requests a backend has consumed and not yet answered, keyed by the id the frontend chose, in
/// the order they were consumed: the in-flight journal a restarted backend replays. A second
/// request with an id already in flight is rejected (its response would be ambiguous).
#[derive(Debug, Clone)]
pub struct InFlight<T> {
    entries: Vec<(u64, T)>,
    capacity: usize,
}

impl<T> InFlight<T> {
    /// A journal for at most `capacity` requests (normally the ring size).
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Vec::with_capacity(capacity),
            capacity,
        }
    }

    /// Record a consumed request.
    pub fn insert(&mut self, id: u64, value: T) -> Result<(), RingError> {
        if self.entries.iter().any(|(i, _)| *i == id) {
            return Err(RingError::DuplicateId(id));
        }
        if self.entries.len() >= self.capacity {
            return Err(RingError::IdsExhausted(self.capacity));
        }
        self.entries.push((id, value));
        Ok(())
    }

    /// The request `id` was answered: forget it.
    pub fn remove(&mut self, id: u64) -> Result<T, RingError> {
        let pos = self
            .entries
            .iter()
            .position(|(i, _)| *i == id)
            .ok_or(RingError::UnknownId(id))?;
        Ok(self.entries.remove(pos).1)
    }

    /// Whether `id` is in flight.
    pub fn contains(&self, id: u64) -> bool {
        self.entries.iter().any(|(i, _)| *i == id)
    }

    /// Requests in flight.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Requests in flight, in the order they were consumed (the replay order).
    pub fn iter(&self) -> impl Iterator<Item = (u64, &T)> {
        self.entries.iter().map(|(i, v)| (*i, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_allocator_matches_out_of_order_and_rejects_unknown() {
        let mut ids = IdAllocator::new(3);
        let a = ids.alloc("a").unwrap();
        let b = ids.alloc("b").unwrap();
        let c = ids.alloc("c").unwrap();
        assert_eq!((a, b, c), (0, 1, 2));
        assert_eq!(ids.alloc("d"), Err(RingError::IdsExhausted(3)));
        assert_eq!(ids.complete(1), Ok("b"));
        assert_eq!(
            ids.complete(1),
            Err(RingError::UnknownId(1)),
            "duplicate response"
        );
        assert_eq!(ids.complete(3), Err(RingError::UnknownId(3)));
        assert_eq!(ids.complete(u64::MAX), Err(RingError::UnknownId(u64::MAX)));
        assert_eq!(ids.alloc("e"), Ok(1));
        assert_eq!(ids.get(2), Some(&"c"));
        assert_eq!(ids.len(), 3);
        assert_eq!(ids.drain(), vec![(0, "a"), (1, "e"), (2, "c")]);
        assert!(ids.is_empty());
        assert_eq!(ids.alloc("f"), Ok(0));
    }

    #[test]
    fn in_flight_journal_rejects_duplicates_and_keeps_order() {
        let mut j = InFlight::new(2);
        j.insert(900, 'x').unwrap();
        assert_eq!(j.insert(900, 'y'), Err(RingError::DuplicateId(900)));
        j.insert(5, 'z').unwrap();
        assert_eq!(j.insert(6, 'w'), Err(RingError::IdsExhausted(2)));
        assert_eq!(j.iter().collect::<Vec<_>>(), vec![(900, &'x'), (5, &'z')]);
        assert_eq!(j.remove(900), Ok('x'));
        assert_eq!(j.remove(900), Err(RingError::UnknownId(900)));
        assert!(j.contains(5));
        assert_eq!(j.len(), 1);
    }
}
