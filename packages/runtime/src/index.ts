// @cfrsam/runtime: running the model in a stage service. The onnxruntime-node worker pool (inference
// off the event loop), the shared stage-service start-up, and the NATS JetStream feature tier.
export * from './workerPool';
export * from './stageService';
export * from './featureStore';
