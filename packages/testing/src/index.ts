// @cfrsam/testing: helpers the tests import from source (vitest compiles them; never built).
export * from './testSupport';
export * from './natsTestSupport';
export * from './tlsTestSupport';
