//! Output vectors for the allocating conveniences, recycled instead of freed.
//!
//! An allocating call (`forward_nd`, `backward_nd`) hands out its outputs as
//! [`Out`] vectors. When one is dropped, its memory goes back to the [`OutputCache`] it came
//! from, and the next call that needs an output of about that size takes it from there. Without
//! this, every call of a training loop would get fresh memory from the system allocator, which
//! for blocks above 32 MiB (glibc's largest mmap threshold) means fresh zero-filled pages and a
//! page fault per 4 KiB on first write — for large outputs that costs more than the
//! normalization itself.
//!
//! The cache keeps at most [`OutputCache::MAX_FREE`] vectors, each of at least
//! [`OutputCache::MIN_BYTES`] (smaller ones are cheap to allocate and are simply freed).
//! [`Out::into_vec`] detaches a vector from the cache for good.

use std::any::Any;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, PoisonError};

use crate::dtype::try_zeroed_vec;
use crate::{Element, Result};

/// A cache of freed output vectors, shared by the outputs it hands out (see the module docs).
#[derive(Default)]
pub struct OutputCache {
    free: Mutex<Vec<Box<dyn Any + Send>>>,
}

impl fmt::Debug for OutputCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutputCache").field("free", &self.lock().len()).finish()
    }
}

impl OutputCache {
    /// Vectors smaller than this (in bytes) are not kept.
    pub const MIN_BYTES: usize = 1 << 20;
    /// At most this many freed vectors are kept (the oldest goes first).
    pub const MAX_FREE: usize = 8;

    /// An empty cache.
    pub fn new() -> Arc<OutputCache> {
        Arc::new(OutputCache::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Box<dyn Any + Send>>> {
        // A panic while holding the lock leaves only a list of free vectors behind: still valid.
        self.free.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A vector of `len` elements for an output that will be overwritten entirely: a recycled one
    /// (its elements hold stale values, never uninitialized memory) or a new zeroed one;
    /// [`Error::OutOfMemory`](crate::Error::OutOfMemory) naming `tensor` when neither can be had.
    pub fn try_vec<T: Element>(
        self: &Arc<Self>,
        tensor: &'static str,
        len: usize,
    ) -> Result<Out<T>> {
        let bytes = len.saturating_mul(size_of::<T>());
        let recycled = if bytes >= Self::MIN_BYTES { self.take::<T>(len) } else { None };
        let vec = match recycled {
            Some(mut v) => {
                // `take` returns only vectors whose capacity holds `len`: no allocation here.
                if v.len() >= len {
                    v.truncate(len);
                } else {
                    v.resize(len, T::zeroed());
                }
                v
            }
            None => try_zeroed_vec(tensor, len)?,
        };
        Ok(Out { vec, cache: Some(self.clone()) })
    }

    /// The smallest kept `Vec<T>` that holds `len` elements without wasting more than half.
    fn take<T: Element>(&self, len: usize) -> Option<Vec<T>> {
        let mut free = self.lock();
        let fits = |b: &Box<dyn Any + Send>| {
            b.downcast_ref::<Vec<T>>().map(|v| v.capacity()).filter(|&c| c >= len && c / 2 <= len)
        };
        let best =
            (0..free.len()).filter_map(|i| fits(&free[i]).map(|c| (c, i))).min().map(|(_, i)| i)?;
        free.remove(best).downcast::<Vec<T>>().ok().map(|v| *v)
    }

    /// Gives a vector back for reuse (one that came from [`OutputCache::try_vec`] and was taken out
    /// with [`Out::into_vec`], or any other): what [`Out`]'s drop does.
    pub fn vec_returned<T: Element>(&self, v: Vec<T>) {
        self.put(v)
    }

    fn put<T: Element>(&self, v: Vec<T>) {
        if v.capacity() * size_of::<T>() < Self::MIN_BYTES {
            return;
        }
        let mut free = self.lock();
        free.push(Box::new(v));
        if free.len() > Self::MAX_FREE {
            free.remove(0);
        }
    }

    /// How many freed vectors the cache holds now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the cache holds no freed vectors.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An output vector that returns to its [`OutputCache`] when dropped. It dereferences to the
/// `Vec<T>` it holds; [`Out::into_vec`] keeps the vector for good.
pub struct Out<T: Element> {
    vec: Vec<T>,
    cache: Option<Arc<OutputCache>>,
}

impl<T: Element> Out<T> {
    /// A plain vector, with no cache to return to.
    pub fn detached(vec: Vec<T>) -> Out<T> {
        Out { vec, cache: None }
    }

    /// The vector, detached from its cache.
    pub fn into_vec(mut self) -> Vec<T> {
        self.cache = None;
        std::mem::take(&mut self.vec)
    }
}

impl<T: Element> Drop for Out<T> {
    fn drop(&mut self) {
        if let Some(cache) = self.cache.take() {
            cache.put(std::mem::take(&mut self.vec));
        }
    }
}

impl<T: Element> Deref for Out<T> {
    type Target = Vec<T>;
    fn deref(&self) -> &Vec<T> {
        &self.vec
    }
}

impl<T: Element> DerefMut for Out<T> {
    fn deref_mut(&mut self) -> &mut Vec<T> {
        &mut self.vec
    }
}

impl<T: Element> Clone for Out<T> {
    /// A copy of the elements, in a plain vector (a clone does not draw on the cache).
    fn clone(&self) -> Out<T> {
        Out::detached(self.vec.clone())
    }
}

impl<T: Element> fmt::Debug for Out<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.vec.fmt(f)
    }
}

impl<T: Element> PartialEq for Out<T> {
    fn eq(&self, other: &Out<T>) -> bool {
        self.vec == other.vec
    }
}

impl<T: Element> PartialEq<Vec<T>> for Out<T> {
    fn eq(&self, other: &Vec<T>) -> bool {
        &self.vec == other
    }
}

impl<T: Element> From<Vec<T>> for Out<T> {
    fn from(vec: Vec<T>) -> Out<T> {
        Out::detached(vec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_outputs_are_recycled_small_ones_are_not() {
        let cache = OutputCache::new();
        let big = 1 << 19; // 2 MiB of f32
        let first = cache.try_vec::<f32>("t", big).unwrap();
        let ptr = first.as_ptr();
        drop(first);
        assert_eq!(cache.len(), 1);
        let again = cache.try_vec::<f32>("t", big - 7).unwrap();
        assert_eq!(again.as_ptr(), ptr, "the freed vector is reused");
        assert_eq!(again.len(), big - 7);
        assert!(cache.is_empty());
        drop(again);
        // Another dtype does not take it; too small a request does not waste it.
        assert_eq!(cache.try_vec::<f64>("t", big / 2).unwrap().len(), big / 2);
        let small = cache.try_vec::<f32>("t", big / 4).unwrap();
        assert_ne!(small.as_ptr(), ptr);
        drop(small);
        drop(cache.try_vec::<f32>("t", 10).unwrap());
        let kept = cache.try_vec::<f32>("t", big).unwrap().into_vec();
        assert_eq!(kept.as_ptr(), ptr);
        assert_eq!(cache.len(), 1, "the f64 vector (the quarter-size f32 one is under MIN_BYTES)");
    }

    use crate::Error;

    #[test]
    fn an_impossible_size_is_an_error_not_an_abort() {
        let cache = OutputCache::new();
        let err = cache.try_vec::<f32>("y", 1 << 60).unwrap_err();
        assert_eq!(err, Error::OutOfMemory { tensor: "y", bytes: 1 << 62 });
    }

    #[test]
    fn the_cache_is_bounded() {
        let cache = OutputCache::new();
        let outs: Vec<Out<f32>> =
            (0..20).map(|i| cache.try_vec("t", 300_000 + i).unwrap()).collect();
        drop(outs);
        assert_eq!(cache.len(), OutputCache::MAX_FREE);
    }
}
