"""What the tests share: real peers, test images, queues on both backends, the cluster's programs."""
