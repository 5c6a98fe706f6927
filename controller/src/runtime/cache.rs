//! The controller's copies of the objects it reads (its caches, and each controller's own):
//! filled by watches, without managedFields, which nothing here reads and which can weigh as
//! much as the object (every writer of an offer has its entry). A controller of many objects
//! (offers) reconciles from its cache's copy and changes ([`watched`], [`controller_on`])
//! instead of keeping a copy of its own.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio_util::task::AbortOnDropHandle;

use crate::runtime::context::lock;

/// What a watch can keep a copy of.
pub trait Cached:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static
{
}

impl<K> Cached for K where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static
{
}

/// The watch of every `K` that `config` selects, keeping `writer`'s store filled as it is
/// polled.
fn reflected<K: Cached>(
    client: &Client,
    config: watcher::Config,
    writer: Writer<K>,
) -> impl Stream<Item = watcher::Result<watcher::Event<K>>> + Send + use<K> {
    watcher(Api::<K>::all(client.clone()), config)
        .default_backoff()
        .modify(|object| object.meta_mut().managed_fields = None)
        .reflect(writer)
}

/// A controller of every `K` that `config` selects, its own copies kept like the caches'.
pub fn controller<K: Cached>(client: &Client, config: watcher::Config) -> Controller<K> {
    let (store, writer) = reflector::store();
    Controller::for_stream(reflected(client, config, writer).applied_objects(), store)
}

/// A cache of every `K` that `config` selects, kept filled by its own task until dropped.
pub fn cache<K: Cached>(
    client: &Client,
    config: watcher::Config,
) -> (Store<K>, AbortOnDropHandle<()>) {
    let (store, writer) = reflector::store();
    let fill = reflected(client, config, writer).for_each(|_| std::future::ready(()));
    (store, AbortOnDropHandle::new(tokio::spawn(fill)))
}

/// [`cache`], noting which objects changed (in the cache already when noted) for a controller
/// that reconciles them from it ([`controller_on`]).
pub fn watched<K: Cached>(
    client: &Client,
    config: watcher::Config,
) -> (Store<K>, Arc<Changes<K>>, AbortOnDropHandle<()>) {
    let (store, writer) = reflector::store();
    let changes = Arc::new(Changes::new());
    let fill = reflected(client, config, writer).for_each({
        let changes = changes.clone();
        move |event| {
            match event {
                Ok(
                    watcher::Event::Apply(object)
                    | watcher::Event::InitApply(object)
                    | watcher::Event::Delete(object),
                ) => changes.note(ObjectRef::from_obj(&object)),
                Ok(watcher::Event::Init | watcher::Event::InitDone) | Err(_) => {}
            }
            std::future::ready(())
        }
    });
    (store, changes, AbortOnDropHandle::new(tokio::spawn(fill)))
}

/// A controller of the objects of `store`: each reconciled once when it starts (as a fresh
/// watch would) and again whenever `changes` notes it, looked up in `store`.
pub fn controller_on<K: Cached>(store: Store<K>, changes: Arc<Changes<K>>) -> Controller<K> {
    // Changes noted before now are reconciled again: twice, never missed.
    let everything: Vec<ObjectRef<K>> =
        store.state().iter().map(|o| ObjectRef::from_obj(&**o)).collect();
    let changed = futures::stream::unfold(changes, |changes| async move {
        let batch = changes.next().await;
        Some((futures::stream::iter(batch), changes))
    });
    Controller::for_stream(futures::stream::pending(), store)
        .reconcile_on(futures::stream::iter(everything).chain(changed.flatten()))
}

/// The objects of a cache that changed since its controller last took them: a set, so it holds
/// at most one reference per object while no controller takes them (a replica not leading).
pub struct Changes<K: Cached> {
    changed: Mutex<HashSet<ObjectRef<K>>>,
    noted: Notify,
}

impl<K: Cached> Changes<K> {
    fn new() -> Self {
        Changes { changed: Mutex::new(HashSet::new()), noted: Notify::new() }
    }

    fn note(&self, object: ObjectRef<K>) {
        lock(&self.changed).insert(object);
        self.noted.notify_one();
    }

    fn take(&self) -> Vec<ObjectRef<K>> {
        lock(&self.changed).drain().collect()
    }

    /// The objects changed since the last call, once there is at least one.
    async fn next(&self) -> Vec<ObjectRef<K>> {
        loop {
            let changed = self.take();
            if !changed.is_empty() {
                return changed;
            }
            self.noted.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use gpumarket_crds::GpuOffer;

    use super::*;

    #[tokio::test]
    async fn changes_hold_one_reference_per_object_and_wake_their_controller() {
        let changes: Arc<Changes<GpuOffer>> = Arc::new(Changes::new());
        // Noted while nobody takes them (a replica not leading): one each, however many times.
        for _ in 0..1000 {
            changes.note(ObjectRef::new("a"));
            changes.note(ObjectRef::new("b"));
        }
        let mut first = changes.next().await;
        first.sort_by(|x, y| x.name.cmp(&y.name));
        assert_eq!(first, [ObjectRef::new("a"), ObjectRef::new("b")]);

        // A controller waiting is woken by the next change.
        let waiting = tokio::spawn({
            let changes = changes.clone();
            async move { changes.next().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "nothing changed yet");
        changes.note(ObjectRef::new("c"));
        let woken = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert_eq!(woken.expect("woken").expect("joined"), [ObjectRef::new("c")]);
    }
}
