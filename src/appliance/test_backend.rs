//! For tests: a folder store seen as an object store (no `folder()`), counting its range reads,
//! object reads and listings, and slow to read a range as a network would be — the object-store code paths
//! on a real store, without a network.

use crate::store::{Backend, Folder, ObjectInfo};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Debug)]
pub struct Remote {
    folder: Folder,
    reads: Arc<AtomicUsize>,
    gets: Arc<AtomicUsize>,
    lists: Arc<AtomicUsize>,
}

impl Remote {
    pub fn new(root: &Path) -> Remote {
        Remote {
            folder: Folder::new(root),
            reads: Default::default(),
            gets: Default::default(),
            lists: Default::default(),
        }
    }
    /// Counts range reads in `reads`.
    pub fn counting_reads(mut self, reads: Arc<AtomicUsize>) -> Remote {
        self.reads = reads;
        self
    }
    /// Counts whole-object reads in `gets`.
    pub fn counting_gets(mut self, gets: Arc<AtomicUsize>) -> Remote {
        self.gets = gets;
        self
    }
    /// Counts listings in `lists`.
    pub fn counting_lists(mut self, lists: Arc<AtomicUsize>) -> Remote {
        self.lists = lists;
        self
    }
}

impl Backend for Remote {
    fn locate(&self, key: &str) -> PathBuf {
        self.folder.locate(key)
    }
    fn get(&self, key: &str) -> io::Result<Option<Vec<u8>>> {
        self.gets.fetch_add(1, Ordering::Relaxed);
        self.folder.get(key)
    }
    fn read_at(&self, key: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(std::time::Duration::from_millis(20));
        self.folder.read_at(key, offset, len)
    }
    fn put(&self, key: &str, bytes: &[u8]) -> io::Result<()> {
        self.folder.put(key, bytes)
    }
    fn put_file(&self, key: &str, file: &Path) -> io::Result<()> {
        self.folder.put_file(key, file)
    }
    fn list(&self, prefix: &str) -> io::Result<Vec<ObjectInfo>> {
        self.lists.fetch_add(1, Ordering::Relaxed);
        self.folder.list(prefix)
    }
    fn delete(&self, key: &str) -> io::Result<()> {
        self.folder.delete(key)
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.folder.rename(from, to)
    }
}
