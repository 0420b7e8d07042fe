// @cfrsam/rpc: the gRPC plumbing every service shares. Generated protos, status errors with
// google.rpc details, server bootstrap, clients with deadlines and tracing, telemetry, flags.
export * as segmentationProto from './gen/cfrsam/v1/segmentation';
export * as stagesProto from './gen/cfrsam/v1/stages';
export * from './status';
export * from './config';
export * from './lruCache';
export * from './tracing';
export * from './telemetry';
export * from './rpc';
export * from './server';
export * from './client';
export * from './codec';
export * from './serviceMain';
export * from './discovery';
export * from './replicas';
export * from './identity';
export * from './auth';
export * from './log';
