//! Tests of the fake Kubernetes API server (tests/support/fake_api) driven by the real kube
//! client, `kube::Api` with k8s-openapi types and `kube::runtime` watchers and reflectors.

#[path = "support/fake_api/mod.rs"]
mod fake_api;

use fake_api::FakeApi;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::ListParams;

#[tokio::test]
async fn smoke_list() {
    let fake = FakeApi::start().await;
    let client = fake.client().await;
    let api: Api<Service> = Api::namespaced(client, "default");
    let list = api.list(&ListParams::default()).await.expect("list");
    assert!(list.items.is_empty());
}
