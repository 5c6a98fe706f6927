//! The controller's copies of the objects it reads (its caches, and each controller's own):
//! filled by watches, without managedFields, which nothing here reads and which can weigh as
//! much as the object (every writer of an offer has its entry).

use futures::{Stream, StreamExt};
use kube::api::Api;
use kube::runtime::reflector::{self, Store, store::Writer};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio_util::task::AbortOnDropHandle;

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
