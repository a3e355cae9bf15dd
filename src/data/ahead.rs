//! An iterator run on a thread of its own, its items handed over through a bounded channel, so
//! that producing the next items overlaps the consumer's work on this one. Stopping returns the
//! iterator and the items it produced that were never taken, so that a caller can account for
//! them (the data report counts only batches trained on).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

pub struct ReadAhead<I: Iterator> {
    rx: Option<Receiver<I::Item>>,
    stop: Arc<AtomicBool>,
    /// The iterator, and the item the channel refused when the receiver went away.
    handle: Option<JoinHandle<(I, Option<I::Item>)>>,
}

impl<I> ReadAhead<I>
where
    I: Iterator + Send + 'static,
    I::Item: Send + 'static,
{
    /// Runs `iter` on a thread named `name`, at most `queued` items waiting in the channel
    /// (0: each item waits on the thread until taken) besides the one the thread holds.
    pub fn new(iter: I, queued: usize, name: &str) -> Self {
        let (tx, rx) = sync_channel(queued);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let mut iter = iter;
                while !stopped.load(Ordering::SeqCst) {
                    let Some(item) = iter.next() else { break };
                    if let Err(refused) = tx.send(item) {
                        return (iter, Some(refused.0));
                    }
                }
                (iter, None)
            })
            .unwrap_or_else(|e| panic!("spawning the {name} thread: {e}"));
        Self { rx: Some(rx), stop, handle: Some(handle) }
    }

    /// Stops the thread after the item it is producing, and returns the iterator with the items
    /// produced but not taken, in order.
    pub fn stop(mut self) -> (I, Vec<I::Item>) {
        self.stop.store(true, Ordering::SeqCst);
        // Until the thread has stopped and dropped its end: whatever it still sends is untaken.
        let mut untaken: Vec<I::Item> = self.rx.take().expect("open").iter().collect();
        let (iter, refused) = self.handle.take().expect("running").join().expect("a read-ahead thread panicked");
        untaken.extend(refused);
        (iter, untaken)
    }
}

impl<I: Iterator> Iterator for ReadAhead<I> {
    type Item = I::Item;

    fn next(&mut self) -> Option<Self::Item> {
        self.rx.as_ref()?.recv().ok()
    }
}

impl<I: Iterator> Drop for ReadAhead<I> {
    fn drop(&mut self) {
        // The thread stops at its next send (the receiver gone) or its next item.
        self.stop.store(true, Ordering::SeqCst);
        self.rx.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_every_item_in_order() {
        let ahead = ReadAhead::new(0..100, 3, "test");
        assert_eq!(ahead.collect::<Vec<_>>(), (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn stopping_returns_the_items_never_taken() {
        for queued in [0, 1, 4] {
            let mut ahead = ReadAhead::new(0..1000, queued, "test");
            let taken: Vec<i32> = ahead.by_ref().take(5).collect();
            let (mut rest, untaken) = ahead.stop();
            assert_eq!(taken, [0, 1, 2, 3, 4]);
            // Taken, then untaken, then what the iterator still holds: every item once, in order.
            let all: Vec<i32> = taken.into_iter().chain(untaken.iter().copied()).chain(rest.by_ref()).collect();
            assert_eq!(all, (0..1000).collect::<Vec<_>>(), "queued {queued}");
            assert!(untaken.len() <= queued + 1, "queued {queued}: {} untaken", untaken.len());
        }
    }
}
