//! The partition log reader against the real RabbitMQ: acknowledgements that arrive out of
//! order (two apply lanes finishing in the other order) keep the reader's channel open.

use std::time::Duration;

use shared::broker::{BrokerConfig, BrokerLink, LogDelivery, PartitionLogs};
use shared::domain::log::ResumePoint;
use tokio::sync::mpsc;

async fn next_delivery(sink: &mut mpsc::Receiver<LogDelivery>) -> LogDelivery {
    tokio::time::timeout(Duration::from_secs(10), sink.recv())
        .await
        .expect("a delivery within 10 s")
        .expect("the reader is running")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_earlier_delivery_acknowledged_after_a_later_one_keeps_the_reader_running() {
    let name = tests::unique_name();
    let settings = tests::test_settings(&name, &[("SESSIONS_PARTITIONS", "1")]);
    let config = BrokerConfig::from_settings(&settings, format!("{name}-reader"), None);
    let (sink, mut deliveries) = mpsc::channel(16);
    let mut logs = PartitionLogs::connect(&config, &name, 16, sink)
        .await
        .expect("connect the reader (declares the partition log)");
    let link = BrokerLink::new(config.clone(), None);
    for index in 0..3 {
        link.publish_commands(0, &format!("m{index}"), None, b"payload")
            .await
            .expect("publish");
    }
    logs.read(0, &ResumePoint::Beginning).await.expect("read");
    let first = next_delivery(&mut deliveries).await;
    let second = next_delivery(&mut deliveries).await;
    let third = next_delivery(&mut deliveries).await;
    assert!(first.offset < second.offset && second.offset < third.offset);

    // The later batch settles first; the earlier ones are already covered by its `multiple`.
    third.ack_through().await.expect("acknowledge the third");
    first.ack_through().await.expect("acknowledge the first");
    second.ack_through().await.expect("acknowledge the second");

    // The channel is still open: a new message is delivered and acknowledged, and nothing
    // reports the reader broken.
    link.publish_commands(0, "m3", None, b"payload")
        .await
        .expect("publish");
    let fourth = next_delivery(&mut deliveries).await;
    assert_eq!(fourth.message_id.as_deref(), Some("m3"));
    fourth.ack_through().await.expect("acknowledge the fourth");
    assert!(
        tokio::time::timeout(Duration::from_secs(2), logs.broken())
            .await
            .is_err(),
        "the reader broke after out-of-order acknowledgements"
    );
    assert!(logs.is_current(&fourth));

    logs.close().await;
    link.close().await;
    tests::delete_broker_topology(&settings, &name).await;
}
