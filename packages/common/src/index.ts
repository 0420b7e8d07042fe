// Public surface of @cfrsam/common. Each area lives in its own module; import what you need.
export * as segmentationProto from './gen/cfrsam/v1/segmentation';
export * as stagesProto from './gen/cfrsam/v1/stages';
